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
``log pi(rejected) - log pi_ref(rejected)``, with the reference scored by lm-eval's own
``hf`` model (fp32, batch 1) on the same (context, choice) requests. Margins within 1e-4
nats count as ties (half a point): that is the size of fp32 batch-composition noise, so a
model compared with itself scores exactly 0.5.
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
        self._reference = None

    def build_all_requests(self, *args, **kwargs):
        check_request_options(self, kwargs, reference=bool(self._reference_name))
        return super().build_all_requests(*args, **kwargs)

    def _reference_lls(self, doc: dict) -> list[float]:
        if self._reference is None:
            from lm_eval.models.huggingface import HFLM

            metadata = self.config.metadata or {}
            self._reference = HFLM(pretrained=self._reference_name, dtype="float32", batch_size=1,
                                   device=metadata.get("reference_device", "cpu"),
                                   trust_remote_code=remote_code_allowed(metadata))
        requests = [Instance("loglikelihood", doc, (doc["context"], choice), i) for i, choice in enumerate(doc["choices"])]
        return [ll for ll, _ in self._reference.loglikelihood(requests, disable_tqdm=True)]

    def process_results(self, doc, results):
        out = super().process_results(doc, results)
        if self._reference_name:
            policy = [ll for ll, _ in results]
            reference = self._reference_lls(doc)
            margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
            out["reward_acc"] = 0.5 if abs(margin) <= TIE else float(margin > 0)
        return out

    def aggregation(self):
        aggregations = super().aggregation()
        if self._reference_name:
            aggregations["reward_acc"] = mean  # lm-eval knows its stderr
        return aggregations

    def higher_is_better(self):
        better = super().higher_is_better()
        if self._reference_name:
            better["reward_acc"] = True
        return better
