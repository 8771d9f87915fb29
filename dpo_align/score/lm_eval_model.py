"""``--model dpo-hf``: lm-eval's ``hf`` model, with the LM head applied at continuation positions only.

lm-eval's ``HFLM`` scores a (context, continuation) request by building full-vocabulary
logits for every position of the padded batch and then keeping the continuation's. For a
135M model with a 49,152-token vocabulary at batch 16 that is gigabytes of logits, most of
them for prompt positions nobody reads. This class runs the same backbone over the same
right-padded batch (same sorting, same left truncation, same autocast), then gathers the
hidden states that predict continuation tokens and applies the LM head and log-softmax to
those alone, a bounded number of positions at a time.

Everything else is ``HFLM``: loading (``pretrained``, ``peft``, ``dtype``, ``gguf_file``,
``trust_remote_code``...), generation and rolling log-likelihoods, so ``--model_args`` are
those of ``hf``. Requests it cannot handle exactly (a non-causal backend, prompt-learning
adapters with virtual tokens, logit transforms it does not know, ``batch_size=auto``) go to
``HFLM`` unchanged.

Registered with lm-eval when this module is imported: ``dpo-align eval`` does that. lm-eval's
own CLI looks models up before it imports any task code, so from the command line use
``dpo-lm-eval`` (``dpo_align/score/lm_eval_cli.py``: lm-eval's CLI with this model registered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from dpo_align.core.pair_logps import logit_transform, scale_logits

MODEL_NAME = "dpo-hf"


@register_model(MODEL_NAME)
class ResponseOnlyHFLM(HFLM):
    # LM-head positions per call: bounds the [positions, vocab] logits (1024 x 49,152 fp32 = 200 MB)
    head_chunk = 1024
    # padded tokens per forward: a batch of long documents is split so that activations stay
    # bounded whatever --batch_size is (each row is computed alone anyway: right padding, causal)
    max_batch_tokens = 2048

    def _head_setup(self):
        """(backbone, head, softcap, scale), or None where HFLM's own path must be used."""
        if self.backend != "causal" or self.batch_size == "auto":
            return None
        model = self.model
        if hasattr(model, "peft_config"):
            if any(getattr(cfg, "is_prompt_learning", False) for cfg in model.peft_config.values()):
                return None  # virtual tokens shift every position
            model = model.get_base_model()
        backbone, head = getattr(model, "base_model", None), model.get_output_embeddings()
        if backbone is None or backbone is model or head is None:
            return None
        try:
            softcap, scale = logit_transform(model.config)
        except NotImplementedError:
            return None
        return backbone, head, softcap, scale

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        setup = self._head_setup()
        if setup is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        backbone, head, softcap, scale = setup
        batch_size = int(override_bs or self.batch_size)
        # HFLM's order: longest first (ties by tokens), so batches hold similar lengths
        order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][1]) + len(requests[i][2])), tuple(requests[i][1] + requests[i][2])))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for start in range(0, len(order), batch_size):
            for part in self._token_budget(order[start:start + batch_size], requests):
                for i, answer in zip(part, self._score(part, requests, backbone, head, softcap, scale), strict=True):
                    answers[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        bar.close()
        return answers

    def _token_budget(self, chunk: list[int], requests) -> list[list[int]]:
        """Split a batch (longest first) so that no forward holds more than ``max_batch_tokens`` padded tokens."""
        parts, width = [[]], 0
        for i in chunk:
            if parts[-1] and (len(parts[-1]) + 1) * width > self.max_batch_tokens:
                parts.append([])
            if not parts[-1]:  # the first request of a part is its longest: it sets the padded width
                width = min(len(requests[i][1]) + len(requests[i][2]) - 1, self.max_length)
            parts[-1].append(i)
        return [part for part in parts if part]

    def _score(self, chunk: list[int], requests, backbone, head, softcap, scale) -> list[tuple[float, bool]]:
        """(summed log-prob, greedy) of each request's continuation, from one right-padded forward."""
        inputs, continuations = [], []
        for i in chunk:
            _, context, continuation = requests[i]
            assert len(context) > 0 and 0 < len(continuation) <= self.max_length
            inputs.append((context + continuation)[-(self.max_length + 1):][:-1])  # HFLM's left truncation
            continuations.append(continuation)
        width = max(len(x) for x in inputs)
        batch = torch.zeros((len(inputs), width), dtype=torch.long)  # right-padded with 0, as HFLM's pad_and_concat
        index, targets = [], []
        for row, (tokens, continuation) in enumerate(zip(inputs, continuations, strict=True)):
            batch[row, :len(tokens)] = torch.tensor(tokens)
            first = len(tokens) - len(continuation)  # the position that predicts the first continuation token
            index += range(row * width + first, row * width + len(tokens))
            targets += continuation
        index = torch.tensor(index, device=self.device)
        targets = torch.tensor(targets, device=self.device)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            hidden = backbone(input_ids=batch.to(self.device)).last_hidden_state
            hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)
            token_logps, token_greedy = [], []
            for lo in range(0, len(targets), self.head_chunk):
                logits = scale_logits(head(hidden[lo:lo + self.head_chunk]), softcap, scale)
                log_softmax = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                target = targets[lo:lo + self.head_chunk]
                token_logps.append(log_softmax.gather(1, target[:, None]).squeeze(1))
                token_greedy.append(log_softmax.argmax(-1) == target)
        sizes = [len(c) for c in continuations]
        return [(float(logps.sum()), bool(greedy.all()))
                for logps, greedy in zip(torch.cat(token_logps).split(sizes), torch.cat(token_greedy).split(sizes), strict=True)]
