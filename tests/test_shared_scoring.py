"""`--model dpo-hf` computes each context once for all its continuations: the same numbers as lm-eval's own `hf`."""

from __future__ import annotations

import random

import pytest

from dpo_align.score.lm_eval_model import ResponseOnlyHFLM

from .helpers import with_chat_template


def requests_of(tokenizer, seed: int = 0) -> list[tuple]:
    """(cache key, context ids, continuation ids): contexts with 1 to 5 continuations, one request repeated."""
    rng = random.Random(seed)
    words = "the fox jumps over a lazy dog while Maria bakes bread and Sarah answers every question".split()
    out = []
    for doc in range(7):
        context = tokenizer.encode("Instruction: " + " ".join(rng.choices(words, k=rng.randint(3, 25))) + "\nResponse:")
        for _ in range(1 if doc == 0 else rng.randint(2, 5)):  # document 0: a context with one continuation
            out.append((None, context, tokenizer.encode(" " + " ".join(rng.choices(words, k=rng.randint(1, 12))))))
    out.append(out[3])  # sent twice (as the dpo_ppl and dpo_contrast tasks send each reference)
    return out


def scores(model: ResponseOnlyHFLM, requests, *, shared: bool) -> list[tuple[float, bool]]:
    if shared:
        return model._loglikelihood_tokens(requests, disable_tqdm=True)
    return super(ResponseOnlyHFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)  # lm-eval's HFLM: one row each


# the Llama has grouped-query attention (2 heads, 1 key-value head); the Gemma a sliding window of 8 on one layer and
# soft-capped logits; the Mistral a window of 8 on every layer
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "mistral"])
def test_shared_rows_give_hf_s_numbers_in_any_order(arch, request):
    model = ResponseOnlyHFLM(pretrained=str(request.getfixturevalue(f"tiny_{arch}")), dtype="float32", batch_size=4, device="cpu")
    requests = requests_of(model.tokenizer)
    hf = scores(model, requests, shared=False)
    ours = scores(model, requests, shared=True)
    assert [g for _, g in ours] == [g for _, g in hf]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in hf], rel=1e-6)
    rows, alone = model._shared_rows(list(range(len(requests) - 1)), requests)
    assert alone == [0] and len(rows) == 6 and min(len(r) for r in rows) > 1  # shared, but for the context with one continuation
    order = list(range(len(requests)))
    random.Random(1).shuffle(order)
    shuffled = scores(model, [requests[i] for i in order], shared=True)
    assert [shuffled[order.index(i)][0] for i in range(len(requests))] == pytest.approx([ll for ll, _ in ours], rel=1e-6)


def test_a_request_lm_eval_would_truncate_is_scored_alone_and_truncated_the_same_way(tiny_llama):
    model = ResponseOnlyHFLM(pretrained=str(tiny_llama), dtype="float32", batch_size=4, device="cpu")
    requests = requests_of(model.tokenizer)
    lengths = sorted(len(c) + len(x) for _, c, x in requests)
    model._max_length = lengths[len(lengths) // 2] - 1  # HFLM's max_length: half the requests no longer fit
    long = [i for i, (_, c, x) in enumerate(requests) if len(c) + len(x) > model.max_length + 1]
    assert long and len(long) < len(requests)  # some are cut from the left of the context, others fit
    rows, alone = model._shared_rows(list(range(len(requests))), requests)
    assert set(long) <= set(alone) and not set(long) & {i for row in rows for i in row}  # a request to truncate is never shared
    assert rows  # and the others still are
    hf, ours = scores(model, requests, shared=False), scores(model, requests, shared=True)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in hf], rel=1e-6)


def test_with_apply_chat_template_the_contrast_suite_is_hf_s(tiny_gpt2, tiny_data, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dpo_align.score.evaluate import include_path

    model_dir = with_chat_template(tiny_gpt2, tmp_path / "chatty")
    metadata = {"pretrained": str(model_dir), "data_dir": str(tiny_data), "pku_path": str(tiny_data / "pku.jsonl.gz")}
    got = {}
    for name in ("hf", "dpo-hf"):
        results = lm_eval.simple_evaluate(
            model=name, model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=["dpo_contrast_suite"],
            task_manager=TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata),
            apply_chat_template=True, batch_size=3, device="cpu", log_samples=True)
        got[name] = [r for task in sorted(results["samples"]) for s in results["samples"][task] for r in s["foils"]]
        assert "<|assistant|>" in str(results["samples"]["dpo_contrast_truthfulqa"][0]["arguments"])
    assert [n for n, _, _ in got["dpo-hf"]] == pytest.approx([n for n, _, _ in got["hf"]], rel=1e-6)
