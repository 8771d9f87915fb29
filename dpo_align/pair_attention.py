"""Attention for shared-prompt rows that skips what the mask would throw away.

The 4D mask of ``pair_batch`` is exact, but with an explicit mask SDPA computes every
query-key block of the row: the upper triangle, the rejected-to-chosen block and the
padding, and on a CPU it also expands the grouped key/value heads. Knowing the layout, each
pair is two SDPA calls instead:

* prompt + chosen: plain causal attention (``is_causal=True``: the kernel skips the upper
  triangle and keeps grouped key/value heads grouped);
* rejected: its queries against the prompt's keys and its own, causal among themselves.

Registered with transformers as the attention implementation ``dpo_shared_prompt``; a call
without ``pair_segments`` (anything but the shared-prompt forward) is plain SDPA, and masks
are built as for SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "dpo_shared_prompt"


def shared_prompt_attention(module, query, key, value, attention_mask, *, pair_segments=None, dropout=0.0, scaling=None, **kwargs):
    """``query`` [B, H, L, D], ``key``/``value`` [B, KV, L, D]; returns [B, L, H, D] as SDPA does."""
    if pair_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for row, segments in enumerate(pair_segments):
        q, k, v = query[row:row + 1], key[row:row + 1], value[row:row + 1]
        for start, p, c, n in segments:
            chosen_end, end = start + p + c, start + p + c + n
            first, _ = sdpa_attention_forward(module, q[:, :, start:chosen_end], k[:, :, start:chosen_end], v[:, :, start:chosen_end],
                                              None, dropout=dropout, scaling=scaling, is_causal=True)
            keys = torch.cat([k[:, :, start:start + p], k[:, :, chosen_end:end]], dim=2)
            values = torch.cat([v[:, :, start:start + p], v[:, :, chosen_end:end]], dim=2)
            mask = torch.ones(n, p + n, dtype=torch.bool, device=query.device)
            mask[:, p:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            second, _ = sdpa_attention_forward(module, q[:, :, chosen_end:end], keys, values, mask[None, None],
                                               dropout=dropout, scaling=scaling, is_causal=False)
            out[row, start:chosen_end] = first[0]
            out[row, chosen_end:end] = second[0]
    return out, None


AttentionInterface.register(NAME, shared_prompt_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_shared_prompt_attention(model) -> bool:
    """Switch an SDPA model to this attention; False (mask-only path) for other implementations."""
    if model.config._attn_implementation not in ("sdpa", NAME):
        return False
    model.set_attn_implementation(NAME)
    return True
