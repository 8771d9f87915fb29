"""The shared-prompt trainer computes what stock TRL computes: layout, log-probs, every loss, gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_align.core.pair_batch import SharedPromptCollator

from .conftest import SHARED_DATA, needs_shared_data
from .helpers import transcript

# Every loss of TRL 1.16's DPOTrainer (its own error message lists them).
LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
COMPARED = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]


# --------------------------------------------------------------------------- layout


def example(p, c, r, start=10):
    return {"prompt_ids": list(range(start, start + p)), "chosen_ids": list(range(100, 100 + c)), "rejected_ids": list(range(200, 200 + r))}


def test_one_row_per_pair_positions_restart_and_rejected_never_sees_chosen():
    batch = SharedPromptCollator(pad_token_id=0)([example(3, 2, 4)])
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 100, 101, 200, 201, 202, 203]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    mask = batch["attention_mask"][0, 0]
    assert mask[5:, 3:5].sum() == 0  # rejected rows, chosen columns
    assert mask[5:, :3].all()  # rejected tokens see the whole prompt
    assert torch.equal(mask[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())
    # first chosen and first rejected token are both predicted from the last prompt position (2)
    index, targets = batch["logp_index"].tolist(), batch["logp_targets"].tolist()
    assert index == [2, 3, 2, 5, 6, 7] and targets == [100, 101, 200, 201, 202, 203]
    assert batch["completion_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]


def test_truncation_follows_trl_keep_start():
    batch = SharedPromptCollator(pad_token_id=0, max_length=5)([example(3, 4, 1)])
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 100, 101, 200]  # (prompt + chosen)[:5], (prompt + rejected)[:5]


def test_packing_puts_short_pairs_in_one_row_with_a_block_diagonal_mask():
    examples = [example(6, 3, 3), example(2, 1, 1, start=20), example(2, 2, 2, start=30)]
    loose = SharedPromptCollator(pad_token_id=0)(examples)
    packed = SharedPromptCollator(pad_token_id=0, pack=True)(examples)
    assert loose["input_ids"].shape == (3, 12)
    assert packed["input_ids"].shape == (2, 12)  # 12 | 6 + 4 (+2 padding), longest first
    row = packed["attention_mask"][1, 0]
    assert row[:6, 6:10].sum() == 0 and row[6:10, :6].sum() == 0  # the two pairs never see each other
    assert packed["position_ids"][1, 6:10].tolist() == [0, 1, 2, 2]  # the second pair starts at position 0
    assert packed["real_tokens"].sum() == loose["real_tokens"].sum() == 22
    assert row[10:, 10:].diagonal().all()  # padding attends to itself (SDPA would give NaN otherwise)


# --------------------------------------------------------------------------- against stock TRL


def pairs_file(directory: Path) -> Path:
    rows = []
    for i in range(8):
        context = [f"What is the capital of France? ({i})"]
        if i % 2:  # multi-turn prompts
            context += ["Paris, I think.", "Are you sure? Tell me more about the fox and the dog."]
        chosen = "Paris is the capital. The quick brown fox jumps over the lazy dog. " * (1 + i % 3)
        rows.append({"chosen": transcript(context + [chosen]), "rejected": transcript(context + [f"No. {i}"])})
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_trainers(model_path, data, tmp_path, *, max_length, **dpo_settings):
    """Stock DPOTrainer (reference forward at every step) and ours, on one model, with the same random LoRA weights."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from dpo_align.core.models import load_model, load_tokenizer
    from dpo_align.data.pairs import read_pairs, to_dataset
    from dpo_align.train.fast_dpo import SharedPromptDPOTrainer

    tokenizer = load_tokenizer(str(model_path))
    pairs, _ = read_pairs([str(data)])
    dataset = to_dataset(pairs, "alpaca", tokenizer).remove_columns("instruction")
    trainers = []
    for cls, precompute in ((DPOTrainer, False), (SharedPromptDPOTrainer, True)):
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, max_length=max_length, use_cpu=True,
                         bf16=False, report_to=[], gradient_checkpointing=False, precompute_ref_log_probs=precompute, **dpo_settings)
        model = load_model(str(model_path), dtype=torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        trainers.append(cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora))
    generator = torch.Generator().manual_seed(0)
    for trainer in trainers:
        generator.manual_seed(0)
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:  # LoRA B starts at zero: make policy and reference differ
                param.data = torch.randn(param.shape, generator=generator) * 0.2
        trainer.model.train()
    return trainers


# DiscoPOP mixes its two losses by sigmoid(logits / tau) with TRL's tau 0.05, so the fp32 rounding of the
# log-probs (summed in another order by the shared-prompt rows) reaches its gradient 20x amplified: measured
# 1.2-1.3e-4 on the llama model on one host (also with the weights in float64, since the log-probs are fp32),
# under 1e-4 on another. AOT unpaired sorts the chosen log-ratios on their own: on the tiny Gemma two pairs' chosen
# log-ratios tie to fp32 rounding (-0.46408 both: prompts that differ in one digit, chosen responses cut to the same 22
# tokens), so which pair takes which rank is the sort's tie-break and the gradients differ by 5.2e-4 while the loss
# agrees to 1e-7. Every other loss type keeps 1e-4.
GRADIENT_RTOL = {"discopop": 5e-4, "aot_unpaired": 1e-3}


def loss_metrics_and_grads(trainer, loss_type, n=4, weights=None):
    """One batch's loss, logged metrics and LoRA gradients under ``loss_type`` (a name, or a list weighed by ``weights``)."""
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    trainer.loss_types, trainer.loss_weights = types, weights or [1.0] * len(types)
    trainer.label_smoothing = 0.1 if {"exo_pair", "robust"} & set(types) else 0.0
    trainer._metrics["train"].clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), metrics, grads


@pytest.mark.parametrize("head", ["tiled", "plain", "trl"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_every_loss_type_and_the_lora_gradients_equal_stock_trl(arch, head, request, tmp_path, monkeypatch):
    """gemma3: a sliding window of 8 under the shared-prompt mask, scaled tied embeddings, soft-capped logits."""
    from dpo_align.core import pair_logps

    model_path = request.getfixturevalue(f"tiny_{arch}")
    data = pairs_file(tmp_path)
    # prompts are 67 (one turn) or 127 (three turns) tokens: max_length 150 cuts responses of both kinds
    stock, ours = build_trainers(model_path, data, tmp_path, max_length=150)
    # the CPU's tiled head (tiles of 64 rows here: several per batch, the last one short), the one-tile head it
    # replaced, and TRL's chunked kernel used on GPUs
    ours.model.get_base_model().pair_logps_head = head
    monkeypatch.setattr(pair_logps, "HEAD_TILE_ELEMENTS", 64 * ours.model.get_base_model().get_output_embeddings().weight.size(0))
    assert len(stock.train_dataset) == len(ours.train_dataset) == 8
    cut = [len(p) + len(c) > 150 for p, c in zip(stock.train_dataset["prompt_ids"], stock.train_dataset["chosen_ids"], strict=True)]
    assert any(cut[:4]) and not all(cut[:4])
    for loss_type in LOSS_TYPES:
        loss_s, metrics_s, grads_s = loss_metrics_and_grads(stock, loss_type)
        loss_o, metrics_o, grads_o = loss_metrics_and_grads(ours, loss_type)
        assert loss_o == pytest.approx(loss_s, rel=1e-4, abs=1e-6), loss_type
        for key in COMPARED:
            assert metrics_o[key] == pytest.approx(metrics_s[key], rel=1e-4, abs=1e-5), (loss_type, key)
        assert grads_o.keys() == grads_s.keys() and grads_s
        for name, grad in grads_s.items():  # norm-wise: single entries can cancel to ~0 in either
            error = (grads_o[name] - grad).norm() / grad.norm().clamp(min=1e-12)
            assert error < GRADIENT_RTOL.get(loss_type, 1e-4), f"{loss_type} {name}: relative gradient error {error:.2e}"
        assert any(g.norm() > 0 for g in grads_s.values())
    # the rewards are not trivially zero: policy and reference really differ
    assert abs(metrics_s["rewards/chosen"]) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weighted_loss_lists_equal_stock_trl_and_the_weights_scale_the_components(arch, tiny_gpt2, tiny_llama, tmp_path):
    """--loss-type sigmoid,sft --loss-weights 1,0.5 (RPO and the like): the total and its gradients are stock TRL's, and the
    total is the weighted sum of the components, each computed alone."""
    stock, ours = build_trainers(tiny_gpt2 if arch == "gpt2" else tiny_llama, pairs_file(tmp_path), tmp_path, max_length=150)
    for types, weights in ((["sigmoid", "sft"], [1.0, 1.0]), (["sigmoid", "sft"], [1.0, 0.5]), (["ipo", "sft", "hinge"], [0.3, 1.0, 2.0])):
        loss_s, _, grads_s = loss_metrics_and_grads(stock, types, weights=weights)
        loss_o, _, grads_o = loss_metrics_and_grads(ours, types, weights=weights)
        assert loss_o == pytest.approx(loss_s, rel=1e-4, abs=1e-6), types
        for name, grad in grads_s.items():
            assert (grads_o[name] - grad).norm() / grad.norm().clamp(min=1e-12) < 1e-4, (types, name)
        components = [loss_metrics_and_grads(ours, t)[0] for t in types]
        assert loss_o == pytest.approx(sum(w * c for w, c in zip(weights, components, strict=True)), rel=1e-5), (types, weights)
        assert components[0] != pytest.approx(components[1], rel=1e-3)  # the components differ, so the weights matter


def test_packed_rows_give_the_same_numbers(tiny_llama, tmp_path):
    data = pairs_file(tmp_path)
    _, ours = build_trainers(tiny_llama, data, tmp_path, max_length=256)
    loss_a, metrics_a, _ = loss_metrics_and_grads(ours, "sigmoid", n=8)
    ours.data_collator.pack = True
    batch = ours.data_collator([ours.train_dataset[i] for i in range(8)])
    assert batch["input_ids"].shape[0] < 8  # some pairs really share a row
    loss_b, metrics_b, _ = loss_metrics_and_grads(ours, "sigmoid", n=8)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert metrics_b["logps/chosen"] == pytest.approx(metrics_a["logps/chosen"], rel=1e-5)


@pytest.mark.slow
@needs_shared_data
@pytest.mark.parametrize("model", ["default_model_path", "gemma3_270m_path"])
def test_real_model_log_probs_equal_stock_trl(model, request, tmp_path):
    """SmolLM2 (Llama) in fp32, and Gemma 3 270M in fp64, from the first pairs of the training pool.

    Gemma in fp32 does not hold 1e-4: with the test's random LoRA on its 18 layers, fp32 rounding alone moves the summed
    chosen log-prob of 2 pairs from fp64's -1511.89 to -1509.77 (stock TRL) and -1509.50 (ours), 1.4e-3 both, so the two
    fp32 results differ by 1.8e-4 while each is as far from the exact value as the other. In fp64 the computations are
    compared, not their rounding. 2 pairs cut to 256 tokens keep stock TRL's full [4, 256, 262k] logits near 2 GB."""
    import gzip

    n, max_length = (4, 512) if model == "default_model_path" else (2, 256)
    tolerance = 1e-4 if model == "default_model_path" else 1e-6
    rows = []
    with gzip.open(SHARED_DATA / "splits" / "train-pool.jsonl.gz", "rt") as f:
        for line in f:
            rows.append(line)
            if len(rows) == n:
                break
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(rows))
    stock, ours = build_trainers(request.getfixturevalue(model), data, tmp_path, max_length=max_length)
    keys = ["logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "entropy"]
    if model == "gemma3_270m_path":
        stock.model.double(), ours.model.double()
        keys = keys[:2]  # the rewards use the reference log-probs ours computed (in fp32) when it was built
    _, metrics_s, _ = loss_metrics_and_grads(stock, "sigmoid", n=n)
    _, metrics_o, _ = loss_metrics_and_grads(ours, "sigmoid", n=n)
    for key in keys:
        assert metrics_o[key] == pytest.approx(metrics_s[key], rel=tolerance, abs=1e-5), key


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "mistral"])
@pytest.mark.parametrize("pack", [False, True])
def test_shared_rows_score_each_response_as_its_own_sequence_would(arch, pack, request):
    from transformers import AutoModelForCausalLM

    from dpo_align.core.pair_logps import add_pair_logps, model_inputs, pair_sums

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(f"tiny_{arch}"), attn_implementation="sdpa").eval()
    add_pair_logps(model)
    generator = torch.Generator().manual_seed(0)
    examples = [{key: torch.randint(5, 300, (n,), generator=generator).tolist()
                 for key, n in zip(("prompt_ids", "chosen_ids", "rejected_ids"), sizes, strict=True)}
                for sizes in [(20, 6, 9), (3, 2, 2), (4, 1, 3), (11, 4, 4)]]
    batch = SharedPromptCollator(pad_token_id=0, pack=pack)(examples)
    assert (batch["input_ids"].shape[0] < 4) == pack
    with torch.no_grad():
        chosen, rejected = pair_sums(model(**model_inputs(batch)).log_probs)
        alone = []
        for ex in examples:
            for response in (ex["chosen_ids"], ex["rejected_ids"]):
                ids = torch.tensor([ex["prompt_ids"] + response])
                logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
                alone.append(logps[len(ex["prompt_ids"]) - 1:].sum())
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).flatten(), torch.stack(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sft_alone_feeds_no_rejected_response_and_equals_stock_trl(arch, tiny_gpt2, tiny_llama, tmp_path):
    """loss_type ["sft"]: the rows hold prompt + chosen only (fewer tokens fed), no reference pass runs, and the loss and
    LoRA gradients are stock DPOTrainer's with loss_type ["sft"] (fp32, 1e-4)."""
    stock, ours = build_trainers(tiny_gpt2 if arch == "gpt2" else tiny_llama, pairs_file(tmp_path), tmp_path, max_length=150, loss_type=["sft"])
    assert ours.chosen_only and ours.ref_logps_report["train"]["mode"].startswith("skipped")
    full = type(ours.data_collator)(pad_token_id=ours.data_collator.pad_token_id, max_length=150)
    examples = [ours.train_dataset[i] for i in range(4)]
    assert ours.data_collator(examples)["real_tokens"].sum() < full(examples)["real_tokens"].sum()
    loss_s, _, grads_s = loss_metrics_and_grads(stock, "sft")
    loss_o, _, grads_o = loss_metrics_and_grads(ours, "sft")
    assert loss_o == pytest.approx(loss_s, rel=1e-4, abs=1e-6)
    assert grads_o.keys() == grads_s.keys() and grads_s
    for name, grad in grads_s.items():
        assert (grads_o[name] - grad).norm() / grad.norm().clamp(min=1e-12) < 1e-4, name


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "llama"])
def test_a_chosen_response_has_the_same_log_prob_in_training_and_in_scoring(arch, request, tmp_path):
    """The tokens training feeds are the tokens scoring feeds: TRL's prompt + chosen (its EOS aside) and the suite's
    context + response, for a tokenizer without a BOS (GPT-2, SmolLM2) and for tokenizers that add one, Gemma's and a
    Llama's (TRL adds it to the prompt; lm-eval 0.4.13's `hf` encodes with the tokenizer's default, so it adds it too;
    without it Gemma 3's ce is 26-64% higher). So scoring a pairs file as the PKU set gives each pair's chosen log-prob,
    from the base model, to fp32 rounding."""
    from dpo_align.core.pair_logps import model_inputs
    from dpo_align.eval_run import run_eval

    model_path = request.getfixturevalue(f"tiny_{arch}")
    data = pairs_file(tmp_path)
    _, ours = build_trainers(model_path, data, tmp_path, max_length=512)  # nothing cut: the whole response in both
    tokenizer = ours.processing_class
    examples = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
    assert all(ex["chosen_ids"][-1] == tokenizer.eos_token_id for ex in examples)
    assert all((ex["prompt_ids"][0] == tokenizer.bos_token_id) == (arch != "gpt2") for ex in examples)
    batch = ours.data_collator(examples)
    with torch.no_grad(), ours.model.disable_adapter():
        log_probs = ours.model(**model_inputs(batch)).log_probs
    lengths = [len(ex["chosen_ids"]) for ex in examples]
    trained = [-log_probs[i, :n - 1].sum().item() for i, n in enumerate(lengths)]  # the EOS TRL appends is not scored

    runs = run_eval([str(model_path)], adapters=[], output=tmp_path / "scores", limit=None, data_dir=None, pku_path=str(data),
                    template="alpaca", batch_size=4, device="cpu", dtype="float32", trust_remote_code=False, datasets=["pku"],
                    controls=False, progress=lambda m: None)
    assert runs
    docs = [json.loads(line) for line in open(next((tmp_path / "scores" / "samples").iterdir()) / "dpo_ppl_pku.jsonl")]
    docs.sort(key=lambda d: d["doc_id"])
    assert [d["tokens"] for d in docs] == [n - 1 for n in lengths]
    assert [d["nll"] for d in docs] == pytest.approx(trained, rel=1e-5)


HEAD_PEAK = r"""
import json, re, sys, torch
from dpo_align.core import pair_logps

def peak_mb():  # this process's own high-water mark (ru_maxrss would carry the parent's across exec)
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

pair_logps.HEAD_TILE_ELEMENTS = 1 << 22  # 16 MB tiles
torch.manual_seed(0)
head = torch.nn.Linear(32, 65536, bias=False).requires_grad_(False)
hidden = torch.randn(1024, 32, requires_grad=True)
targets = torch.randint(0, 65536, (1024,))
before = peak_mb()
if sys.argv[1] == "tiled":
    log_probs = pair_logps._TiledHead.apply(hidden, head.weight, None, targets, None, 1.0, ("entropy",), {})
else:
    log_probs = pair_logps._plain_head(hidden, head, targets, softcap=None, scale=1.0, outputs=("entropy",))[0]
log_probs.sum().backward()
print(json.dumps({"rise_mb": peak_mb() - before, "log_probs": log_probs.sum().item(), "grad": hidden.grad.norm().item()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_cpu_head_keeps_no_vocabulary_wide_tensor_for_the_backward_pass():
    """1,024 response positions on a 65,536 vocabulary: one [N, vocab] fp32 tensor is 256 MB, and the one-tile head keeps
    the log-softmax for its backward pass and makes its gradient as wide; the tiled head (16 MB tiles here) peaks far
    lower, with the same log-probs and gradient. (glibc's malloc is told to map every block over 1 MB, so that freed tiles
    leave the resident set at once, as the real head's 256 MB tiles do: by default it raises that threshold up to 32 MB
    as blocks are freed, and keeps freed tiles of this test's size in its heap.)"""
    runs = {}
    for kernel in ("tiled", "plain"):
        done = subprocess.run([sys.executable, "-c", HEAD_PEAK, kernel], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        assert done.returncode == 0, done.stderr[-2000:]
        runs[kernel] = json.loads(done.stdout.strip().splitlines()[-1])
    tiled, plain = runs["tiled"], runs["plain"]
    assert plain["rise_mb"] > 500 and tiled["rise_mb"] < plain["rise_mb"] / 4, runs
    assert tiled["log_probs"] == pytest.approx(plain["log_probs"], rel=1e-5) and tiled["grad"] == pytest.approx(plain["grad"], rel=1e-5)


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (None, 0.0625), (30.0, 1.0), (3.0, 2.5)])
def test_the_tiled_head_equals_the_one_tile_head_under_a_logit_scale_and_soft_capping(softcap, scale, monkeypatch):
    """No tiny model here has a logit scale (Cohere's kind), so the tiled head's scale is checked against the one-tile
    head directly: log-probs, every metric and the gradient reaching the hidden states, on tiles of 8 rows of 37."""
    from dpo_align.core import pair_logps

    monkeypatch.setattr(pair_logps, "HEAD_TILE_ELEMENTS", 8 * 500)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 500, bias=True).requires_grad_(False)
    targets = torch.randint(0, 500, (37,))
    hidden = (4 * torch.randn(37, 16)).requires_grad_(True)  # logits wide enough for a soft-cap of 3 to bend them
    plain = pair_logps._plain_head(hidden, head, targets, softcap=softcap, scale=scale, outputs=pair_logps.METRICS)
    (grad_plain,) = torch.autograd.grad(plain[0].sum(), hidden)
    metrics = {}
    tiled = pair_logps._TiledHead.apply(hidden, head.weight, head.bias, targets, softcap, scale, pair_logps.METRICS, metrics)
    (grad_tiled,) = torch.autograd.grad(tiled.sum(), hidden)
    torch.testing.assert_close(tiled, plain[0], rtol=1e-5, atol=1e-5)
    for name, expected in zip(pair_logps.METRICS, plain[1:], strict=True):
        torch.testing.assert_close(metrics[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(grad_tiled, grad_plain, rtol=1e-4, atol=1e-5)
