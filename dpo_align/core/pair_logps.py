"""Per-token log-probs of the response tokens only, from a shared-prompt batch.

The backbone runs over the rows of ``pair_batch.SharedPromptCollator``; only the hidden
states that predict a response token are gathered, and the LM head and log-softmax run
there alone. On GPUs that is TRL's own chunked kernel (``trl.kernels.ChunkedLogProbFunction``:
log-probs, entropy, mean logit, top-1, without materialising ``[N, vocab]`` logits); on a
CPU, a ``log_softmax`` over a tile of rows at a time (``_TiledHead``), 2.5x faster than that
kernel's torch fallback there, and no ``[N, vocab]`` tensor is kept for the backward pass (a
262k vocabulary's would be 4 GB at N = 4,000). Stock TRL on a CPU projects every position of
both padded rows, prompt included.

``add_pair_logps(model)`` patches the model's forward the way TRL patches its fused head:
``model(..., pair_logps=spec)`` returns a ``FusedCausalLMOutput`` whose per-token fields
lie in the ``[2B, R]`` grid of the batch (zero where there is no token), and any other
call runs the original forward. Going through ``model(...)`` keeps PEFT, DDP and
accelerate wrappers in the path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

from dpo_align.core.layer_masks import attention_kinds, layer_masks
from dpo_align.core.pair_batch import SharedPromptCollator, pair_length

PAIR_KEYS = ("logp_index", "logp_targets", "logp_seq", "logp_offset")
# TRL's vocabulary tile for the chunked kernel.
VOCAB_CHUNK = 32768
# The CPU head's tile: rows x vocabulary at most this many logits (256 MB in fp32), a few such tiles alive at once.
HEAD_TILE_ELEMENTS = 1 << 26
# The per-position metrics TRL's kernel returns after the log-probs, in its order.
METRICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def logit_transform(config) -> tuple[float | None, float]:
    """Final-logit soft-capping and scale, as the model's own forward applies them."""
    text = config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    for other in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, other, None) is not None:
            raise NotImplementedError(f"{type(config).__name__} scales its logits with {other}; the shared-prompt trainer does not support it.")
    return softcap, 1.0 if scale is None else scale


def scale_logits(logits: torch.Tensor, softcap: float | None, scale: float) -> torch.Tensor:
    """Apply ``logit_transform``'s scale, then soft-capping, as the model's own forward does."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def add_pair_logps(model, outputs: tuple[str, ...] = ()) -> None:
    """Let ``model(input_ids=..., attention_mask=..., position_ids=..., pair_logps=spec)`` score responses only.

    ``outputs``: optional fields besides ``log_probs`` (``entropy``, ``mean_logits``,
    ``is_top1``, ``log_sum_sq_probs``), as in TRL's ``add_fused_lm_head``.
    """
    if model.config._attn_implementation not in ("sdpa", "eager"):
        raise NotImplementedError(f"{model.config._attn_implementation} attention ignores a 4D attention mask; load the model with "
                                  "attn_implementation='sdpa' (or 'eager') for the shared-prompt trainer.")
    attention_kinds(model.config)  # an attention the shared rows cannot mask is refused now, not at the first batch
    original = model.forward
    softcap, scale = logit_transform(model.config)
    model.pair_logps_head = "auto"  # or "trl" / "tiled" / "plain": which head kernel (tests compare them)

    @functools.wraps(type(model).forward)
    def forward(self, *args, pair_logps=None, **kwargs):
        if pair_logps is None:
            return original(*args, **kwargs)
        return response_logps(self, pair_logps, kwargs, outputs=outputs, softcap=softcap, scale=scale, head_kernel=model.pair_logps_head)

    model.forward = types.MethodType(forward, model)


def response_logps(model, spec: dict, backbone_inputs: dict, *, outputs=(), softcap=None, scale=1.0, head_kernel: str = "auto"):
    from trl.trainer.utils import FusedCausalLMOutput

    backbone_inputs = {k: v for k, v in backbone_inputs.items() if k not in ("labels", "fused_lm_head", "output_router_logits")}
    if backbone_inputs.get("attention_mask") is not None and backbone_inputs["attention_mask"].dim() == 4:
        backbone_inputs["attention_mask"] = layer_masks(model.config, backbone_inputs["attention_mask"], backbone_inputs["position_ids"])
    hidden = model.base_model(**backbone_inputs, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, spec["logp_index"].to(hidden.device))
    targets = spec["logp_targets"].to(hidden.device)
    if head_kernel == "auto":
        # TRL's chunked kernel bounds memory and is fast with Triton (GPUs); its plain-torch fallback makes
        # several passes over each [N, vocab] tile and is 2.5x slower than one log_softmax on a CPU.
        head_kernel = "trl" if hidden.device.type != "cpu" else "tiled" if _frozen_linear(head) else "plain"
    if head_kernel == "trl":
        from trl.kernels import ChunkedLogProbFunction

        fields = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, 1.0, VOCAB_CHUNK, softcap, scale, tuple(outputs))
    elif head_kernel == "tiled":
        metrics = {}
        log_probs = _TiledHead.apply(hidden, head.weight, head.bias, targets, softcap, scale, tuple(outputs), metrics)
        fields = (log_probs, *(metrics.get(name) for name in METRICS))
    else:
        fields = _plain_head(hidden, head, targets, softcap=softcap, scale=scale, outputs=outputs)
    seq, offset = spec["logp_seq"].to(hidden.device), spec["logp_offset"].to(hidden.device)
    shape = spec["grid_shape"]

    def grid(values):
        if values is None:
            return None
        return values.new_zeros(shape).index_put((seq, offset), values)

    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (grid(x) for x in fields)
    label_mask = torch.zeros(shape, dtype=torch.bool, device=hidden.device).index_put((seq, offset), torch.ones_like(targets, dtype=torch.bool))
    return FusedCausalLMOutput(loss=-fields[0].sum() / max(len(targets), 1), log_probs=log_probs, entropy=entropy,
                               log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1, label_mask=label_mask)


def _plain_head(hidden, head, targets, *, softcap, scale, outputs):
    """The same fields as TRL's kernel, from the ``[N, vocab]`` logits of the N response positions."""
    logits = scale_logits(head(hidden).float(), softcap, scale)  # under autocast the projection runs in bf16; the softmax in fp32, as TRL's
    log_softmax = logits.log_softmax(dim=-1)
    log_probs = log_softmax.gather(1, targets[:, None]).squeeze(1)
    with torch.no_grad():  # metrics only, as in TRL
        return log_probs, *_metrics(log_softmax, logits, targets, outputs)


def _metrics(log_softmax, logits, targets, outputs) -> tuple:
    """TRL's per-position metrics (``METRICS`` order) that ``outputs`` asks for, None for the rest."""
    return (-(log_softmax.exp() * log_softmax).sum(-1) if "entropy" in outputs else None,
            torch.logsumexp(2 * log_softmax, dim=-1) if "log_sum_sq_probs" in outputs else None,
            logits.mean(-1) if "mean_logits" in outputs else None,
            (logits.argmax(-1) == targets) if "is_top1" in outputs else None)


def _frozen_linear(head) -> bool:
    """The tiled head computes no gradient for the head's own weights: a plain, frozen ``nn.Linear`` only (a LoRA-wrapped
    or trained head goes through ``_plain_head``)."""
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


class _TiledHead(torch.autograd.Function):
    """log p(target) at N positions through a frozen linear head, a tile of rows at a time.

    For one row, with z = softcap(scale · h Wᵀ) and p = softmax(z), d log p_t / d h = Σ_j (1[j=t] − p_j) z'_j W_j
    = z'_t W_t − (p ⊙ z') W, where z' is the soft-cap's derivative (scale alone without one). The forward pass
    computes that [hidden]-wide direction per row from each tile while the tile's softmax is at hand, so the backward
    pass is one multiply and no [N, vocab] tensor outlives its tile. The FLOPs are the plain head's: two projections
    per row (the logits, and p W here; the plain head's backward projects the logits' gradient instead).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, scale, outputs, metrics):
        with_grad = ctx.needs_input_grad[0]  # not in a reference pass or under inference_mode
        rows = max(1, HEAD_TILE_ELEMENTS // weight.size(0))
        log_probs = hidden.new_empty(len(targets), dtype=torch.float32)
        direction = hidden.new_empty(hidden.shape, dtype=torch.float32) if with_grad else None
        wanted = {name: [] for name in METRICS if name in outputs}
        for start in range(0, len(targets), rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            raw = torch.nn.functional.linear(h, weight, bias).float()  # under autocast: bf16 projection, as head(h)
            if scale != 1.0:  # only where the model scales its logits, in place (no second tile)
                raw.mul_(scale)
            if softcap is not None:
                capped = torch.tanh(raw / softcap)
                slope = (1 - capped.square()) * scale  # d z / d (h Wᵀ)
                logits = capped.mul_(softcap)
            else:
                logits, slope = raw, None
            log_softmax = logits.log_softmax(dim=-1)
            log_probs[start:start + rows] = log_softmax.gather(1, t[:, None]).squeeze(1)
            for name, value in zip(METRICS, _metrics(log_softmax, logits, t, outputs), strict=True):
                if value is not None:
                    wanted[name].append(value)
            if with_grad:
                weighted = log_softmax.exp_()  # p, then p ⊙ z', in place of the log-softmax
                if slope is not None or scale != 1.0:
                    weighted.mul_(slope if slope is not None else scale)
                at_target = slope.gather(1, t[:, None]) if slope is not None else scale
                direction[start:start + rows] = (weight[t].float() * at_target - weighted.to(weight.dtype) @ weight).float()
        empty = {"is_top1": torch.bool}
        metrics.update({name: torch.cat(values) if values else hidden.new_empty(0, dtype=empty.get(name, torch.float32))
                        for name, values in wanted.items()})
        ctx.save_for_backward(direction)
        ctx.hidden_dtype = hidden.dtype
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs):
        (direction,) = ctx.saved_tensors
        return (grad_log_probs[:, None] * direction).to(ctx.hidden_dtype), None, None, None, None, None, None, None


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of a model call for a shared-prompt batch."""
    completion = batch["completion_mask"]
    spec = {key: batch[key] for key in PAIR_KEYS}
    spec["grid_shape"] = (completion.size(0), completion.size(1) - 1)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": batch["attention_mask"],
            "pair_logps": spec}


def pair_sums(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each chosen and each rejected response."""
    return log_probs.sum(dim=1).chunk(2, dim=0)


def summed_logps(model, dataset, *, adapter: bool, max_length: int | None, pad_token_id: int, device,
                 autocast=contextlib.nullcontext, batch_tokens: int = 8192, progress_desc: str = "Log-probs") -> dict[str, torch.Tensor]:
    """Per pair, in inference mode: summed log-probs of the chosen and rejected responses and their
    token counts (``chosen``, ``rejected``, ``chosen_tokens``, ``rejected_tokens``), with the model's
    adapter on or off. ``dataset`` holds TRL's ``prompt_ids``/``chosen_ids``/``rejected_ids``."""
    from tqdm.auto import tqdm

    collate = SharedPromptCollator(pad_token_id=pad_token_id, max_length=max_length)
    # the trainer's dataset holds each pair's row length already (same max_length); compute it only without
    lengths = dataset["length"] if "length" in dataset.column_names else [pair_length(ex, max_length) for ex in dataset]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])  # similar lengths together: little padding
    batches, current = [], []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)

    out = {name: torch.zeros(len(dataset), dtype=torch.float32) for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    adapter_off = model.disable_adapter() if (not adapter and hasattr(model, "disable_adapter")) else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), adapter_off, tqdm(total=len(dataset), desc=progress_desc, unit="pair",
                                                       disable=bool(os.environ.get("TQDM_DISABLE"))) as bar:
            for batch_idx in batches:
                batch = collate([dataset[i] for i in batch_idx])
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
                with autocast():
                    result = model(**inputs)
                c, r = pair_sums(result.log_probs.float())
                n_c, n_r = batch["completion_mask"].sum(dim=1).chunk(2, dim=0)
                for name, values in (("chosen", c), ("rejected", r), ("chosen_tokens", n_c), ("rejected_tokens", n_r)):
                    out[name][batch_idx] = values.float().cpu()
                bar.update(len(batch_idx))
    finally:
        model.train(was_training)
    return out
