"""The dpo_pref_heldout lm-eval task: lm-eval's multiple_choice on held-out pairs, against an independent loop."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_align.score.evaluate import include_path

from .conftest import SHARED_DATA, needs_shared_data
from .helpers import noisy_adapter, transcript

ALPACA = ("Below is an instruction that describes a task.\nWrite a response that appropriately completes the request."
          "\n\n\n### Instruction:\n{}\n\n### Response:")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = [{"chosen": transcript([f"Where is the fox {i}?", "The quick brown fox is in its den, far from the dog." * (1 + i % 2)]),
             "rejected": transcript([f"Where is the fox {i}?", f"No {i}."])} for i in range(6)]
    path = tmp_path_factory.mktemp("pref") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(model, metadata, batch_size=2, tasks=("dpo_pref_heldout",)):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path(), include_defaults=False, metadata={"pretrained": str(model), **metadata})
    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model), "dtype": "float32"}, tasks=list(tasks),
                                   task_manager=manager, batch_size=batch_size, device="cpu", log_samples=True)


def independent_lls(model_dir, docs):
    """Summed log-probs of "\\n" + response after the alpaca prompt, in a plain loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for instruction, responses in docs:
        context = ALPACA.format(instruction)
        lls = []
        for response in responses:
            ctx_ids = tok.encode(context)
            ids = tok.encode(context + "\n" + response)
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            lls.append(sum(logps[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids))))
        out.append(lls)
    return out


def test_acc_and_acc_norm_match_an_independent_loop(tiny_llama, pairs):
    results = evaluate(tiny_llama, {"pref_path": str(pairs)})
    row = results["results"]["dpo_pref_heldout"]
    samples = results["samples"]["dpo_pref_heldout"]
    docs = [(s["doc"]["instruction"], [s["doc"]["chosen"], s["doc"]["rejected"]]) for s in samples]
    want = independent_lls(tiny_llama, docs)
    for sample, lls in zip(samples, want, strict=True):
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(lls, rel=1e-4)
    acc = sum(c > r for c, r in want) / len(want)
    norm = sum(c / (len(d[1][0]) + 1) > r / (len(d[1][1]) + 1) for (c, r), d in zip(want, docs, strict=True)) / len(want)
    assert row["acc,none"] == pytest.approx(acc) and row["acc_norm,none"] == pytest.approx(norm)
    assert isinstance(row["acc_stderr,none"], float) and "reward_acc,none" not in row


def test_reward_accuracy_against_a_reference(tiny_llama, pairs, tmp_path):
    # the model against itself: every margin is exactly 0 (both sides scored alike), so every pair is a tie
    same = evaluate(tiny_llama, {"pref_path": str(pairs), "reference": str(tiny_llama)})
    assert same["results"]["dpo_pref_heldout"]["reward_acc,none"] == 0.5
    assert [s["reward_margin"] for s in same["samples"]["dpo_pref_heldout"]] == [0.0] * 6
    # against another model: the implicit reward's sign, pair by pair
    adapter = noisy_adapter(tiny_llama, tmp_path / "adapter")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "other")
    results = evaluate(tiny_llama, {"pref_path": str(pairs), "reference": str(tmp_path / "other")})
    samples = results["samples"]["dpo_pref_heldout"]
    docs = [(s["doc"]["instruction"], [s["doc"]["chosen"], s["doc"]["rejected"]]) for s in samples]
    policy, reference = independent_lls(tiny_llama, docs), independent_lls(tmp_path / "other", docs)
    wins = [float((p[0] - r[0]) - (p[1] - r[1]) > 0) for p, r in zip(policy, reference, strict=True)]
    assert results["results"]["dpo_pref_heldout"]["reward_acc,none"] == pytest.approx(sum(wins) / len(wins))
    assert [s["reward_acc"] for s in samples] == wins
    margins = [(p[0] - r[0]) - (p[1] - r[1]) for p, r in zip(policy, reference, strict=True)]
    assert [s["reward_margin"] for s in samples] == pytest.approx(margins, abs=1e-3)


def test_a_model_against_itself_ties_exactly_whatever_the_batch(tiny_llama, pairs, tiny_data):
    """A model compared with itself at batch 4, beside another task's requests (lm-eval's own pass batches them
    together): the reference is scored the policy's way, so each margin is exactly 0, not only within the tie band
    (the reference at batch 1 beside a policy at batch 16 once gave reward_acc 0.55 on 10 pairs)."""
    metadata = {"pref_path": str(pairs), "reference": str(tiny_llama), "data_dir": str(tiny_data)}
    results = evaluate(tiny_llama, metadata, batch_size=4, tasks=("dpo_pref_heldout", "dpo_ppl_truthfulqa"))
    assert [s["reward_margin"] for s in results["samples"]["dpo_pref_heldout"]] == [0.0] * 6
    assert results["results"]["dpo_pref_heldout"]["reward_acc,none"] == 0.5


def test_reward_accuracy_outside_lm_evals_evaluator_is_a_clear_error(tiny_llama, pairs):
    """The reference is scored the policy's way, so the task must find the policy; called by hand it says so."""
    from lm_eval.tasks import TaskManager

    metadata = {"pref_path": str(pairs), "reference": str(tiny_llama), "pretrained": str(tiny_llama)}
    task = TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata).load_task_or_group("dpo_pref_heldout")
    task = task["dpo_pref_heldout"]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    doc = task._instances[0].doc
    with pytest.raises(RuntimeError, match=r"the model being evaluated was not found.*or leave `reference` out"):
        task.process_results(doc, [(-1.0, False), (-2.0, False)])


@needs_shared_data
def test_offline_default_is_the_held_out_split(tiny_llama):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path(), include_defaults=False,
                          metadata={"pretrained": str(tiny_llama), "data_dir": str(SHARED_DATA)})
    task = manager.load_task_or_group(["dpo_pref_heldout"])["dpo_pref_heldout"]
    assert len(task.dataset["test"]) == 832  # the 836 held-out rows less 4 unusable (identical responses, no final reply)
    del lm_eval
