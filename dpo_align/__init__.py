"""dpo-align: DPO + LoRA training and templated response-only cross-entropy scoring."""

__version__ = "0.1.0"
