"""``--model dpo-hf``: lm-eval's ``hf`` model, with the LM head applied at continuation positions only.

lm-eval's ``HFLM`` scores a (context, continuation) request by building full-vocabulary
logits for every position of the padded batch and then keeping the continuation's. For a
135M model with a 49,152-token vocabulary at batch 16 that is gigabytes of logits, most of
them for prompt positions nobody reads. This class runs the same backbone over the same
right-padded batch (same sorting, same left truncation, same autocast), then gathers the
hidden states that predict continuation tokens and applies the LM head and log-softmax to
those alone, a bounded number of positions at a time.

Each context is computed once for all its continuations. Requests that share a context (a
document's reference and its foils, ``dpo_contrast_*``) go into one row: the context once, then
each continuation, laid out by the training code's ``shared_segment`` (position ids restart at
the context's end; a 4D mask lets a continuation see the context and itself, never a sibling).
A request sent twice (the dpo_ppl and dpo_contrast tasks both send each reference) is computed
once. A request that lm-eval would truncate (context + continuation longer than the model's
``max_length`` + 1) keeps a row of its own, truncated from the left as ``HFLM`` does, so every
number is the one ``--model hf`` computes.

Everything else is ``HFLM``: loading (``pretrained``, ``peft``, ``dtype``, ``gguf_file``,
``trust_remote_code``...), generation and rolling log-likelihoods, so ``--model_args`` are
those of ``hf``. Requests it cannot handle exactly (a non-causal backend, prompt-learning
adapters with virtual tokens, logit transforms it does not know, ``batch_size=auto``) go to
``HFLM`` unchanged.

Under ``accelerate launch`` (several GPUs, or several CPU processes) each process scores its share
of the requests, as ``HFLM`` does on GPUs, and lm-eval gathers the results on the first.

Registered with lm-eval when this module is imported: ``dpo-align eval`` does that. lm-eval's
own CLI looks models up before it imports any task code, so from the command line use
``dpo-lm-eval`` (``dpo_align/score/lm_eval_cli.py``: lm-eval's CLI with this model registered).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from dpo_align.core.layer_masks import layer_masks
from dpo_align.core.pair_batch import shared_segment
from dpo_align.core.pair_logps import logit_transform, scale_logits

MODEL_NAME = "dpo-hf"


def row_length(row: list[int], requests) -> int:
    """Tokens of a shared row: its context once, then every continuation."""
    return len(requests[row[0]][1]) + sum(len(requests[i][2]) for i in row)


@register_model(MODEL_NAME)
class ResponseOnlyHFLM(HFLM):
    # LM-head positions per call: bounds the [positions, vocab] logits and their log-softmax (256 x 49,152 fp32 =
    # 50 MB each). 1024 held 400 MB at once and put the suite with its controls at 1.79 GB peak; at 256 it is
    # 1.53 GB, with the same numbers (benchmarks/eval_throughput.py, dpo_hf_head1024 against dpo_hf)
    head_chunk = 256
    # padded tokens per forward: a batch of long documents is split so that activations stay
    # bounded whatever --batch_size is (each row is computed alone anyway: right padding, causal)
    max_batch_tokens = 2048
    # every request in a row of its own, duplicates included: the layout before contexts were shared
    # (benchmarks/eval_throughput.py compares the two; the numbers are the same)
    plain_requests = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Data-parallel on CPUs too: HFLM splits the requests across `accelerate launch` processes only when it
        # sees several GPUs; with one process per CPU worker (gloo) each rank scores its share the same way.
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

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
        # A request sent twice (the dpo_ppl and dpo_contrast tasks both send each reference) is computed once.
        def same(i: int) -> tuple:  # what makes two requests one computation (plain: nothing does)
            return (i,) if self.plain_requests else (tuple(requests[i][1]), tuple(requests[i][2]))

        first: dict[tuple, int] = {}
        for i in range(len(requests)):
            first.setdefault(same(i), i)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        # progress in documents (distinct contexts: a document's reference and foils share one), with rate and ETA
        pending = Counter(tuple(requests[i][1]) for i in first.values())
        bar = tqdm(total=len(pending), disable=disable_tqdm or self.rank != 0, desc="Scoring documents", unit="doc")

        def done(i: int, answer) -> None:
            answers[i] = answer
            pending[tuple(requests[i][1])] -= 1
            if not pending[tuple(requests[i][1])]:
                bar.update(1)

        rows, alone = ([], list(first.values())) if self.plain_requests else self._shared_rows(list(first.values()), requests)
        # longest first (ties by tokens), so batches hold similar lengths
        rows.sort(key=lambda row: (-row_length(row, requests), tuple(requests[row[0]][1])))
        for batch in self._row_batches(rows, requests, batch_size):
            for i, answer in self._score_shared(batch, requests, backbone, head, softcap, scale):
                done(i, answer)
        # HFLM's order: longest first (ties by tokens), so batches hold similar lengths
        order = sorted(alone, key=lambda i: (-(len(requests[i][1]) + len(requests[i][2])), tuple(requests[i][1] + requests[i][2])))
        for start in range(0, len(order), batch_size):
            for part in self._token_budget(order[start:start + batch_size], requests):
                for i, answer in zip(part, self._score(part, requests, backbone, head, softcap, scale), strict=True):
                    done(i, answer)
        bar.close()
        for i, (cache_key, _, _) in enumerate(requests):
            answers[i] = answers[first[same(i)]]
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answers[i])
        return answers

    def _shared_rows(self, unique: list[int], requests) -> tuple[list[list[int]], list[int]]:
        """(rows of requests sharing a context, requests scored alone). A row holds one context and as many of its
        continuations as fit in ``max_batch_tokens`` (at least one); a request lm-eval would truncate, or the only one
        of its context, is scored alone."""
        groups: dict[tuple, list[int]] = {}
        alone = []
        for i in unique:
            _, context, continuation = requests[i]
            if len(context) + len(continuation) > self.max_length + 1:
                alone.append(i)
            else:
                groups.setdefault(tuple(context), []).append(i)
        rows = []
        for context, members in groups.items():
            if len(members) == 1:  # nothing to share: the plain causal row (no 4D mask), as before contexts were shared
                alone += members
                continue
            row, used = [], len(context)
            for i in sorted(members, key=lambda i: -len(requests[i][2])):
                if row and used + len(requests[i][2]) > self.max_batch_tokens:
                    rows.append(row)
                    row, used = [], len(context)
                row.append(i)
                used += len(requests[i][2])
            rows.append(row)
        return rows, alone

    def _row_batches(self, rows: list[list[int]], requests, batch_size: int):
        """Rows (longest first) in forwards of at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens."""
        batch, width = [], 0
        for row in rows:
            if batch and (len(batch) + 1 > batch_size or (len(batch) + 1) * width > self.max_batch_tokens):
                yield batch
                batch = []
            if not batch:  # the first row of a batch is its longest: it sets the padded width
                width = row_length(row, requests)
            batch.append(row)
        if batch:
            yield batch

    def _score_shared(self, rows: list[list[int]], requests, backbone, head, softcap, scale):
        """(request index, (summed log-prob, greedy)) of every continuation of ``rows``, from one forward over
        shared-context rows: right padding that attends only to itself, a 4D boolean mask, SDPA as in training."""
        segments = [shared_segment(list(requests[row[0]][1]), [list(requests[i][2]) for i in row]) for row in rows]
        width = max(len(tokens) for tokens, _, _, _ in segments)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        index, targets, order = [], [], []
        for r, (row, (tokens, positions, causal, predictors)) in enumerate(zip(rows, segments, strict=True)):
            n = len(tokens)
            input_ids[r, :n] = torch.tensor(tokens)
            position_ids[r, :n] = torch.tensor(positions)
            mask[r, 0, :n, :n] = causal
            pads = torch.arange(n, width)
            mask[r, 0, pads, pads] = True  # a padding position must attend somewhere, or SDPA gives NaN
            for i, where in zip(row, predictors, strict=True):
                index += [r * width + k for k in where]
                targets += requests[i][2]
                order.append(i)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
        sums = self._continuation_sums(inputs, index, targets, [len(requests[i][2]) for i in order], backbone, head, softcap, scale)
        return zip(order, sums, strict=True)

    def _continuation_sums(self, inputs: dict, index: list[int], targets: list[int], sizes: list[int], backbone, head, softcap, scale):
        """(summed log-prob, greedy) per continuation: one backbone forward over ``inputs``, then the LM head and
        log-softmax at the flat positions ``index`` alone, ``head_chunk`` positions at a time (same autocast as HFLM)."""
        index = torch.tensor(index, device=self.device)
        targets = torch.tensor(targets, device=self.device)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if "attention_mask" in inputs:  # shared-context rows: each layer type its mask (sliding windows by position)
                inputs["attention_mask"] = layer_masks(backbone.config, inputs["attention_mask"], inputs["position_ids"])
            hidden = backbone(**inputs).last_hidden_state
            hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)
            token_logps, token_greedy = [], []
            for lo in range(0, len(targets), self.head_chunk):
                logits = scale_logits(head(hidden[lo:lo + self.head_chunk]), softcap, scale)
                log_softmax = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                target = targets[lo:lo + self.head_chunk]
                token_logps.append(log_softmax.gather(1, target[:, None]).squeeze(1))
                token_greedy.append(log_softmax.argmax(-1) == target)
        return [(float(logps.sum()), bool(greedy.all()))
                for logps, greedy in zip(torch.cat(token_logps).split(sizes), torch.cat(token_greedy).split(sizes), strict=True)]

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
        return self._continuation_sums({"input_ids": batch}, index, targets, [len(c) for c in continuations], backbone, head, softcap, scale)
