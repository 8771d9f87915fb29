"""The one exception type users see.

Anything raised as `UserError` is printed by the CLI as a short paragraph (cause and fix)
with a non-zero exit and no traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says the fix."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite: the run stopped there, unfinished."""

    def __init__(self, step: int, what: str, value: float, output_dir: str = ""):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"Training diverged at step {step}: the {what} is {value}. The run stopped there and nothing was saved as "
                         f"finished{f' in {output_dir}' if output_dir else ''} (no adapter, no manifest). Lower --lr, or check the data.")


def user_error_in(err: BaseException | None) -> UserError | None:
    """The UserError an exception is, or was raised from (lm-eval re-raises some errors of task code inside its own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def install_error_boundary() -> None:
    """Under lm-eval's own command line (``lm_eval --include_path lm_eval_tasks``), where dpo-align's CLI does not
    run: a UserError raised by the task code ends the process with its one-paragraph message and exit 2, as every
    dpo-align command does, instead of a traceback. Any other exception keeps Python's hook (it is a bug)."""
    import os
    import sys

    previous = sys.excepthook
    if getattr(previous, "dpo_align_boundary", False):
        return

    def hook(kind, value, traceback):
        found = user_error_in(value)
        if found is None or os.environ.get("DPO_ALIGN_DEBUG"):
            return previous(kind, value, traceback)
        sys.stderr.write(f"error: {found}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)  # an excepthook cannot set the exit status otherwise

    hook.dpo_align_boundary = True
    sys.excepthook = hook
