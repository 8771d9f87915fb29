"""lm-evaluation-harness task class for the controlled cross-entropy (``dpo_contrast_*``).

Each document is one ``multiple_choice`` item: the templated prompt is the context, and the
choices are the reference response first, then every foil (TruthfulQA's incorrect answers,
WinoGrande's other option, PKU's rejected response), each rendered as ``"\\n" + text`` exactly
like the reference (``dpo_align/score/suite_requests.py``, shared with ``dpo_ppl``). Per task:

* ``ce``: NLL per reference token, token-weighted: equal to ``dpo_ppl``'s on the same documents;
* ``ce_foil``: the same over every foil continuation (all foils of a document pooled);
* ``acc``: the reference has the lowest summed NLL of all its document's responses (lm-eval's
  MC1 rule); ``acc_norm``: the same per UTF-8 byte of the scored text;
* ``foils``: how many foil continuations were scored. Its per-document value, in
  ``--log_samples``, is ``[nll, tokens, bytes]`` of the reference and then of each foil.

A format change moves ``ce`` and ``ce_foil`` alike; a model that prefers the right answer more
lowers ``ce`` more than ``ce_foil`` and raises ``acc``.
"""

from __future__ import annotations

from lm_eval.api.metrics import mean

from dpo_align.score import metrics
from dpo_align.score.suite_requests import SpannedTask, suite_dataset


def truthfulqa(**metadata):
    return suite_dataset("truthfulqa", metadata, foils=True)


def winogrande(**metadata):
    return suite_dataset("winogrande", metadata, foils=True)


def pku(**metadata):
    return suite_dataset("pku", metadata, foils=True)


def total_foils(items) -> float:
    """The ``foils`` aggregation: continuations scored as foils (each item lists the reference first)."""
    return float(sum(len(responses) - 1 for responses in items))


class ContrastTask(SpannedTask):
    """The reference and its foils as one multiple-choice document; see the module docstring."""

    def process_results(self, doc, results):
        responses, truncated = [], False
        for idx, (loglikelihood, _) in enumerate(results):
            span, fitted = self._spans[doc["id"], idx]
            responses.append((-float(loglikelihood), span.tokens, span.bytes))
            truncated |= not fitted
        (nll, n_tokens, n_bytes), foils = responses[0], responses[1:]
        # MC1: the reference strictly below every foil (a tie is not a win)
        correct = all(nll < f_nll for f_nll, _, _ in foils)
        correct_norm = all(nll / n_bytes < f_nll / f_bytes for f_nll, _, f_bytes in foils)
        return {
            "ce": (nll, n_tokens),
            "ce_foil": (sum(f[0] for f in foils), sum(f[1] for f in foils)),
            "acc": float(correct),
            "acc_norm": float(correct_norm),
            "foils": [list(r) for r in responses],
            "truncated": float(truncated),  # the reference's or a foil's prompt was cut to fit the model's window
        }

    def aggregation(self):
        return {"ce": metrics.ce, "ce_foil": metrics.ce, "acc": mean, "acc_norm": mean, "foils": total_foils, "truncated": mean}

    def higher_is_better(self):
        return {"ce": False, "ce_foil": False, "acc": True, "acc_norm": True, "foils": True, "truncated": False}
