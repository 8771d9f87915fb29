"""lm-evaluation-harness task class for the templated response-only cross-entropy.

The YAML files beside this one declare the tasks; this module supplies what YAML cannot:

* the documents (``custom_dataset``), rendered with dpo-align's own templates so scoring
  sees exactly the text layout training used (``dpo_align/score/suite_requests.py``);
* the number of continuation tokens of each request, counted the way lm-eval's HF model
  splits a (context, continuation) pair, so NLL can be averaged per token (the same module);
* token-weighted aggregations (``ce``, ``ppl``, ``bpb``) with closed-form standard errors.

Everything is configured through lm-eval's metadata (``--metadata '{"template": "chat"}'``),
into which lm-eval also copies the ``--model_args``: the tokenizer is the run's own.
"""

from __future__ import annotations

from lm_eval.api.metrics import mean

from dpo_align.data.suite import PPL
from dpo_align.score import metrics
from dpo_align.score.suite_requests import SpannedTask, suite_dataset

METRICS = PPL.metrics


def truthfulqa(**metadata):
    return suite_dataset("truthfulqa", metadata)


def winogrande(**metadata):
    return suite_dataset("winogrande", metadata)


def pku(**metadata):
    return suite_dataset("pku", metadata)


# --------------------------------------------------------------------------- task


class ResponseCrossEntropyTask(SpannedTask):
    """Scores ``"\\n" + response`` after the templated prompt as one loglikelihood request
    and reports NLL per response token (``ce``), its exp (``ppl``) and bits per byte (``bpb``)."""

    # No add_bos_token option: a BOS (or EOS) added to both encodings cancels in the difference.

    def process_results(self, doc, results):
        loglikelihood = results[0][0]
        span, fitted = self._spans[doc["id"], 0]
        nll = -float(loglikelihood)
        return {"ce": (nll, span.tokens), "ppl": (nll, span.tokens), "bpb": (nll, span.bytes), "boundary_merge": float(span.merged),
                "truncated": float(not fitted)}

    def aggregation(self):
        # boundary_merge: the share of documents whose first response characters were merged into
        # the context's last token (so not scored); 0 for the tokenizers of the reference models.
        # truncated: the share whose prompt lm-eval cut from the left to fit the model's window
        return {"ce": metrics.ce, "ppl": metrics.ppl, "bpb": metrics.bpb, "boundary_merge": mean, "truncated": mean}

    def higher_is_better(self):
        return {**dict.fromkeys(METRICS, False), "boundary_merge": False, "truncated": False}
