"""``dpo-align merge``: fold a LoRA adapter into its base model, as a standalone checkpoint."""

from __future__ import annotations

from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import atomic_directory
from dpo_align.core.models import adapter_base, check_adapter_folder, check_weights_safe, load_model, load_tokenizer, locate_model
from dpo_align.core.provenance import same_model


def merge(adapter: Path, output: Path, *, base: str | None = None, overwrite: bool = False,
          trust_remote_code: bool = False, allow_pickle: bool = False, progress=print) -> Path:
    import torch
    from peft import PeftModel

    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output} is not empty. Pass --overwrite or choose another folder.")
    check_adapter_folder(adapter, "adapter")
    check_weights_safe(str(adapter), allow_pickle)
    recorded = adapter_base(adapter)
    if base and recorded and not same_model(base, recorded):  # legitimate when the base moved; a wrong one fails on shapes below
        progress(f"Warning: {adapter} was trained on {recorded}; merging it into --base {base} as asked.")
    base = base or recorded
    if not base:
        raise UserError(f"{adapter / 'adapter_config.json'} names no base model (base_model_name_or_path); pass --base.")
    base_path = locate_model(base, progress=progress)
    model = load_model(base_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"The adapter in {adapter} does not fit the base model {base_path} ({first_line}). "
                        "Pass the base it was trained on with --base.") from None
    merged = model.merge_and_unload()
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_path
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code)

    with atomic_directory(output) as staging:  # a full disk: named, and nothing left behind
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return output
