"""`dpo-align search`: an Optuna study over training settings, scored by the controlled verdict (see study.py)."""
