"""The dpo_contrast tasks: each document's reference beside its foils, rendered, encoded and counted the same way."""

from __future__ import annotations

import pytest

from dpo_align.data.suite_docs import load_docs
from dpo_align.data.templates import render_response
from dpo_align.score.evaluate import include_path
from dpo_align.score.suite_requests import scored_span, tokenizer_for

from .conftest import REPO, SHARED_DATA, needs_shared_data


def evaluate(model_dir, tiny_data, model: str, tasks: list[str], batch_size: int = 1, limit: int | None = None, **model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dpo_align.score.lm_eval_model  # noqa: F401  (registers dpo-hf)

    metadata = {"pretrained": str(model_dir), "data_dir": str(tiny_data), "pku_path": str(tiny_data / "pku.jsonl.gz"), **model_args}
    return lm_eval.simple_evaluate(model=model, model_args={"pretrained": str(model_dir), "dtype": "float32", **model_args}, tasks=tasks,
                                   task_manager=TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata),
                                   batch_size=batch_size, device="cpu", log_samples=True, limit=limit)


def test_the_foils_of_every_dataset(tiny_data):
    tqa = load_docs("truthfulqa", data_dir=str(tiny_data), foils=True)
    # stripped, the repeated one once, the copy of the reference dropped
    assert [d["foils"] for d in tqa] == [["Lyon is the capital.", "Marseille"], ["Boil the flour", "Freeze it"], ["No, it is a word.", "No"]]
    wino = load_docs("winogrande", data_dir=str(tiny_data), foils=True)
    assert [(d["response"], d["foils"]) for d in wino] == [("Maria", ["Sarah"]), ("the fox", ["the dog"])]
    pku = load_docs("pku", pku_path=str(tiny_data / "pku.jsonl.gz"), foils=True)
    assert [(d["response"], d["foils"]) for d in pku] == [("Mix flour and bake it.", ["No."]), ("Paris.", ["Rome."])]
    # the ppl tasks' documents are what they always were: no foils field
    assert all("foils" not in d for d in load_docs("truthfulqa", data_dir=str(tiny_data)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_contrast_ce_is_the_ppl_ce_and_every_response_is_counted_like_the_reference(arch, tiny_gpt2, tiny_llama, tiny_data):
    model_dir = tiny_gpt2 if arch == "gpt2" else tiny_llama
    tokenizer = tokenizer_for({"pretrained": str(model_dir)})
    results = {name: evaluate(model_dir, tiny_data, name, ["dpo_ppl_suite", "dpo_contrast_suite"]) for name in ("hf", "dpo-hf")}
    for key in ("truthfulqa", "winogrande", "pku"):
        for name, result in results.items():
            ppl, contrast = result["results"][f"dpo_ppl_{key}"], result["results"][f"dpo_contrast_{key}"]
            # the same documents and numbers: dpo-hf computes a request both families send once; hf computes it twice
            assert contrast["ce,none"] == pytest.approx(ppl["ce,none"], rel=1e-9 if name == "dpo-hf" else 1e-6), (name, key)
        hf, ours = (results[name]["samples"][f"dpo_contrast_{key}"] for name in ("hf", "dpo-hf"))
        for sample, mine in zip(hf, ours, strict=True):
            doc = sample["doc"]
            assert doc["choices"] == [doc["continuation"]] + [render_response(f, "alpaca") for f in doc["foils"]]
            responses = mine["foils"]
            assert len(responses) == 1 + len(doc["foils"])
            for (nll, tokens, n_bytes), resp, choice in zip(responses, sample["resps"], doc["choices"], strict=True):
                assert nll == pytest.approx(-float(resp[0][0]), rel=1e-6)  # dpo-hf against lm-eval's own hf, per foil
                assert (tokens, n_bytes) == scored_span(tokenizer, doc["context"], choice)[:2]
            nlls = [r[0] for r in responses]
            assert mine["acc"] == float(all(nlls[0] < n for n in nlls[1:]))
            assert mine["acc_norm"] == float(all(nlls[0] / responses[0][2] < r[0] / r[2] for r in responses[1:]))
            assert list(mine["ce_foil"]) == [pytest.approx(sum(nlls[1:])), sum(r[1] for r in responses[1:])]
        assert results["dpo-hf"]["results"][f"dpo_contrast_{key}"]["foils,none"] == sum(len(s["doc"]["foils"]) for s in ours)
    group = results["dpo-hf"]["groups"]["dpo_contrast_suite"]
    tasks = [results["dpo-hf"]["results"][f"dpo_contrast_{k}"] for k in ("truthfulqa", "winogrande", "pku")]
    for metric in ("ce", "ce_foil", "acc", "acc_norm"):
        assert group[f"{metric},none"] == pytest.approx(sum(t[f"{metric},none"] for t in tasks) / 3)


def test_a_peft_adapter_is_scored_with_its_controls(tiny_llama, tiny_data, tmp_path):
    from .helpers import noisy_adapter

    adapter = noisy_adapter(tiny_llama, tmp_path / "adapter")
    base = evaluate(tiny_llama, tiny_data, "dpo-hf", ["dpo_contrast_winogrande"])["results"]["dpo_contrast_winogrande"]
    tuned = evaluate(tiny_llama, tiny_data, "dpo-hf", ["dpo_contrast_winogrande"], peft=str(adapter))["results"]["dpo_contrast_winogrande"]
    assert tuned["ce_foil,none"] != pytest.approx(base["ce_foil,none"], rel=1e-4)  # the adapter moves the foils too


@pytest.mark.slow
@needs_shared_data
def test_the_winogrande_control_reproduces_the_two_option_measurement(default_model_path):
    """The task that replaced benchmarks/winogrande_options.py gives its numbers on the default model: the first
    400 WinoGrande items, the wrong option's ce and how often the right option has the lower NLL."""
    import json

    published = json.loads((REPO / "results" / "seed-reproduction" / "winogrande-options.json").read_text())["results"]["baseline"]
    result = evaluate(default_model_path, SHARED_DATA, "dpo-hf", ["dpo_contrast_winogrande"], batch_size=16, limit=400)
    row = result["results"]["dpo_contrast_winogrande"]
    assert result["n-samples"]["dpo_contrast_winogrande"]["effective"] == published["documents"] == 400
    assert row["acc,none"] == published["accuracy"]  # 203 of 400
    assert row["ce_foil,none"] == pytest.approx(published["ce_wrong"], rel=1e-5)
    assert row["ce,none"] == pytest.approx(published["ce_correct"], rel=1e-5)
