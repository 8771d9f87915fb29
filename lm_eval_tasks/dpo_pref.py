"""lm-evaluation-harness task class for held-out preference accuracy (``dpo_pref_heldout``).

Each held-out hh-rlhf pair is one ``multiple_choice`` document: the templated prompt is the
context and the two choices are the chosen and the rejected response, rendered exactly as
in training and in ``dpo_ppl_*`` (``"\\n" + response`` after the alpaca prompt). lm-eval's own
machinery scores both and reports

* ``acc``: the chosen response has the higher summed log-likelihood;
* ``acc_norm``: the same after dividing by each response's length in characters
  (lm-eval's length normalisation), which removes the pull towards short answers.

With ``--metadata '{"reference": "MODEL"}'`` it also reports ``reward_acc``, the DPO
implicit-reward accuracy: how often ``log pi(chosen) - log pi_ref(chosen)`` exceeds
``log pi(rejected) - log pi_ref(rejected)``, and ``reward_margin``, the mean of that difference
(nats). Both sides are computed the same way: the policy (the model lm-eval is scoring) and the
reference (built as the same lm-eval model class, with the policy's dtype, batch size, maximum
length and device unless ``reference_device`` says otherwise) each score the task's requests in
one call, in the same order, so their batches are composed alike and a model compared with itself
has margins of exactly 0 (``reward_acc`` exactly 0.5). The policy's requests are scored a second
time for this (lm-eval's own pass mixes them with other tasks' requests, so its batches differ).
Margins within 1e-4 nats still count as ties (half a point): between two different models,
numbers closer than fp32 batch noise say nothing.
"""

from __future__ import annotations

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from dpo_align.data.suite_docs import preference_docs
from dpo_align.data.templates import DEFAULT_TEMPLATE, check_template, render_prompt, render_response
from dpo_align.score.suite_requests import check_metadata, check_request_options, remote_code_allowed, tokenizer_for

TIE = 1e-4  # nats


def heldout(**metadata):
    check_metadata(metadata)
    template = check_template(metadata.get("template") or DEFAULT_TEMPLATE, option="metadata 'template'")
    tokenizer = tokenizer_for(metadata) if template == "chat" else None  # the suite's tokenizer rule, remote code typed
    docs = preference_docs(metadata.get("pref_path"), metadata.get("data_dir"))
    for doc in docs:
        doc["context"] = render_prompt(doc["instruction"], template, tokenizer)
        doc["choices"] = [render_response(doc["chosen"], template), render_response(doc["rejected"], template)]
    return {"test": datasets.Dataset.from_list(docs)}


class PreferenceTask(ConfigurableTask):
    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = dict(config or {})
        config.pop("class", None)
        super().__init__(config=config, **kwargs)
        self._reference_name = (self.config.metadata or {}).get("reference")
        self._lls = None  # both sides' log-likelihoods, computed at the first document's results

    def build_all_requests(self, *args, **kwargs):
        check_request_options(self, kwargs, reference=bool(self._reference_name))
        return super().build_all_requests(*args, **kwargs)

    def _both_sides(self) -> dict:
        """{doc id: (policy lls, reference lls)} for every document of this rank, each model called once over the same
        requests in the same order (see the module docstring)."""
        from lm_eval.models.huggingface import HFLM

        from dpo_align.score.suite_requests import evaluating_lm

        metadata = self.config.metadata or {}
        policy = evaluating_lm()
        if policy is None:  # called outside lm-eval's evaluator (or one that no longer names its model `lm`)
            raise RuntimeError("dpo_pref_heldout: reward_acc scores the reference the policy's way, but the model being "
                               "evaluated was not found (lm-eval's evaluate() holds it as `lm`). Run the task through "
                               "lm_eval / lm_eval.simple_evaluate, or leave `reference` out of the metadata.")
        docs = {instance.doc["id"]: instance.doc for instance in self._instances}
        requests = [Instance("loglikelihood", doc, (doc["context"], choice), i) for doc in docs.values()
                    for i, choice in enumerate(doc["choices"])]
        settings = {"pretrained": self._reference_name, "trust_remote_code": remote_code_allowed(metadata)}
        if isinstance(policy, HFLM):  # the policy's own class and settings: its batches are composed the same way
            model_class = type(policy)
            settings.update(dtype=policy.model.dtype, batch_size=policy.batch_size, device=metadata.get("reference_device") or str(policy.device))
            if policy._max_length:
                settings["max_length"] = policy._max_length
        else:  # another backend: lm-eval's hf model, fp32, one request at a time (not the same way; ties stay ties)
            model_class = HFLM
            settings.update(dtype="float32", batch_size=1, device=metadata.get("reference_device", "cpu"))
        reference = model_class(**settings)
        policy_lls = [ll for ll, _ in policy.loglikelihood(requests, disable_tqdm=True)]
        reference_lls = [ll for ll, _ in reference.loglikelihood(requests, disable_tqdm=True)]
        del reference
        out: dict = {}
        for request, mine, theirs in zip(requests, policy_lls, reference_lls, strict=True):
            lls = out.setdefault(request.doc["id"], ([], []))
            lls[0].append(mine)
            lls[1].append(theirs)
        return out

    def process_results(self, doc, results):
        out = super().process_results(doc, results)
        if self._reference_name:
            if self._lls is None:
                self._lls = self._both_sides()
            policy, reference = self._lls[doc["id"]]
            margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
            out["reward_acc"] = 0.5 if abs(margin) <= TIE else float(margin > 0)
            out["reward_margin"] = margin
        return out

    def aggregation(self):
        aggregations = super().aggregation()
        if self._reference_name:
            aggregations["reward_acc"] = mean  # lm-eval knows its stderr
            aggregations["reward_margin"] = mean
        return aggregations

    def higher_is_better(self):
        better = super().higher_is_better()
        if self._reference_name:
            better["reward_acc"] = True
            better["reward_margin"] = True
        return better
