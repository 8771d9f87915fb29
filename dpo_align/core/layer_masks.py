"""The attention mask each layer of a model takes, from one boolean ``[rows, 1, T, T]`` mask and the position ids.

The shared rows (training's prompt + chosen + rejected, scoring's context + continuations) give the model a 4D
mask, and transformers uses a 4D mask as it is, in every layer. A model with sliding-window layers (Gemma 2 and 3,
Mistral, Qwen2 with ``use_sliding_window``) would then let those layers see further back than the window. Positions
restart for each sequence in a shared row, so the window is measured in positions, as a sequence fed alone measures
it in indices: a key is seen when ``0 <= q_pos - k_pos < window`` (transformers' ``sliding_window_overlay``).
"""

from __future__ import annotations

import torch

KNOWN = {"full_attention", "sliding_attention"}


def attention_kinds(config) -> tuple[int | None, set[str]]:
    """(sliding window, layer types) of a model; an error for a kind of attention the shared rows cannot mask."""
    text = config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or [])
    if kinds - KNOWN:
        raise NotImplementedError(f"{type(config).__name__} has {sorted(kinds - KNOWN)} attention layers; the shared-prompt rows "
                                  "support full and sliding-window attention only.")
    return getattr(text, "sliding_window", None), kinds


def layer_masks(config, mask: torch.Tensor, position_ids: torch.Tensor):
    """``mask`` as it is, its sliding-window version (every layer slides), or a mapping by layer type (some slide)."""
    window, kinds = attention_kinds(config)
    if not window or kinds == {"full_attention"}:
        return mask
    distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]
    sliding = mask & (distance < window)
    if not kinds:  # one window for every layer (Mistral)
        return sliding
    return {"full_attention": mask, "sliding_attention": sliding}
