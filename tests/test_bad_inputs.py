"""Bad inputs and faults against every command, as real command lines in a fresh process.

Each case runs the real entry point in its own process (forked from a server that has
imported torch and the rest once: tests/cli_forkserver.py) and asserts the exit code, that no Python traceback is printed, that the message names
the file, line or option (a regular expression), and that nothing that looks finished is left
in the output folder. Outcomes are classified as clean / traceback / silent (exit 0) / unclear
(a wrong code or a message that names nothing) / left-behind; ``results/reliability.md`` is
written from these outcomes when the run asks for it:

    DPO_ALIGN_RELIABILITY_MD=results/reliability.md python -m pytest tests/test_bad_inputs.py
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app

from .helpers import noisy_adapter

# what a finished output looks like: none of these may be left by a failed command
FINISHED = ("manifest.json", "results.json", "adapter_model.safetensors", "model.safetensors", "table.md",
            "compare.md", "report.html")


@dataclass
class Case:
    name: str
    command: str  # the dpo-align sub-command, for the report
    args: list  # strings; "{x}" fields are filled from the workspace
    message: str  # a regular expression the output must match
    code: int = 2
    output: str | None = "{out}"  # the folder that must hold nothing finished ("" for none)
    prepare: str | None = None  # name of a workspace method that sets the case up
    extra_env: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    c = Case
    train = ["train", "--model", "{model}", "--data", "{pairs}", "-o", "{out}", "--max-steps", "2", "--report-generations", "0"]
    sweep = ["sweep", "--model", "{model}", "--data", "{pairs}", "--runs-dir", "{ws}/sweep-runs", "-o", "{out}"]

    def scored_on(folder: str, dataset: str) -> list[str]:  # eval of the tiny model on one set from a broken data folder
        return ["eval", "{model}", "--data-dir", f"{{ws}}/{folder}", "--dataset", dataset, "-o", "{out}"]

    evaluate = ["eval", "{model}", "--data-dir", "{data}", "--pku-path", "{data}/pku.jsonl.gz", "--limit", "1", "-o", "{out}"]
    return [
        # ---- data inspect
        c("missing file", "data inspect", ["data", "inspect", "{ws}/missing.jsonl", "--model", "{model}"], r"missing\.jsonl: no such file", output=""),
        c("empty file", "data inspect", ["data", "inspect", "{ws}/empty.jsonl", "--model", "{model}"], r"empty\.jsonl: the file is empty", output=""),
        c("broken JSON line", "data inspect", ["data", "inspect", "{ws}/broken.jsonl", "--model", "{model}"], r"broken\.jsonl:2: invalid JSON", output=""),
        c("row without rejected", "data inspect", ["data", "inspect", "{ws}/norejected.jsonl", "--model", "{model}"], r"norejected\.jsonl:1:.*rejected", output=""),
        c("unsupported file type", "data inspect", ["data", "inspect", "{ws}/pairs.txt", "--model", "{model}"], r"pairs\.txt", output=""),
        c("unknown template", "data inspect", ["data", "inspect", "{pairs}", "--template", "nosuch"], r"--template", output=""),
        c("example index past the end", "data inspect", ["data", "inspect", "{pairs}", "--model", "{model}", "--example", "999"], r"--example", output=""),
        c("chat template that does not parse", "data inspect", ["data", "inspect", "{pairs}", "--model", "{ws}/badchat", "--template", "chat"],
          r"chat template of .*badchat's tokenizer fails on a one-message conversation \(TemplateSyntaxError", output=""),
        # ---- train: settings, checked before any model loads
        c("lr inf", "train", [*train, "--lr", "inf"], r"--lr must be a finite number"),
        c("lr nan", "train", [*train, "--lr", "nan"], r"--lr must be a finite number"),
        c("lr negative", "train", [*train, "--lr", "-1e-5"], r"--lr must be positive"),
        c("beta inf", "train", [*train, "--beta", "inf"], r"--beta must be a finite number"),
        c("unknown loss type", "train", [*train, "--loss-type", "unknown"], r"--loss-type 'unknown' is not one of"),
        c("robust without label smoothing", "train", [*train, "--loss-type", "robust"], r"--loss-type robust needs --label-smoothing above 0"),
        c("exo_pair without label smoothing", "train", [*train, "--loss-type", "exo_pair"], r"--loss-type exo_pair needs --label-smoothing above 0"),
        c("two stages with no SFT pairs", "train", [*train, "--sft-first-pairs", "0"], r"--sft-first-pairs 0: the first stage needs at least 1 pair"),
        c("two stages of SFT", "train", [*train, "--sft-first-pairs", "8", "--loss-type", "sft"], r"--sft-first-pairs with --loss-type sft would train SFT twice"),
        c("two stages with more SFT pairs than the data", "train", [*train, "--sft-first-pairs", "100000"],
          r"--sft-first-pairs 100000: the training data holds \d+ usable pairs"),
        c("label smoothing 0.5", "train", [*train, "--label-smoothing", "0.5"], r"--label-smoothing 0\.5 must be in \[0, 0\.5\)"),
        c("logging steps 0", "train", [*train, "--logging-steps", "0"], r"--logging-steps must be at least 1"),
        c("eval steps 0", "train", [*train, "--eval-steps", "0"], r"--eval-steps must be at least 1"),
        c("save steps 0", "train", [*train, "--save-steps", "0"], r"--save-steps must be"),
        c("save steps not a number", "train", [*train, "--save-steps", "often"], r"--save-steps"),
        c("batch size 0", "train", [*train, "--batch-size", "0"], r"--batch-size"),
        c("max length 8", "train", [*train, "--max-length", "8"], r"--max-length"),
        c("max length shorter than the template", "train", [*train, "--max-length", "16"], r"--max-length 16.*template"),
        c("lora r 0", "train", [*train, "--lora-r", "0"], r"--lora-r"),
        c("lora dropout 1.5", "train", [*train, "--lora-dropout", "1.5"], r"--lora-dropout"),
        c("lora targets that do not exist", "train", [*train, "--lora-targets", "nosuchmodule"], r"--lora-targets.*nosuchmodule"),
        c("warmup ratio 1", "train", [*train, "--warmup-ratio", "1"], r"--warmup-ratio"),
        c("max pairs 0", "train", [*train, "--max-pairs", "0"], r"--max-pairs"),
        c("unknown pair sample", "train", [*train, "--pair-sample", "shuffled"], r"--pair-sample"),
        c("unknown precision", "train", [*train, "--precision", "fp8"], r"--precision"),
        c("unknown report-to", "train", [*train, "--report-to", "nosuch"], r"--report-to"),
        c("unknown template (train)", "train", [*train, "--template", "nosuch"], r"--template"),
        c("no epochs and no steps", "train", ["train", "--model", "{model}", "--data", "{pairs}", "-o", "{out}", "--epochs", "0"], r"--epochs"),
        c("YAML: learning_rate: fast", "train", ["train", "--config", "{ws}/fast.yaml", "-o", "{out}"], r"learning_rate: expected float"),
        c("YAML: lora_r: [1,2]", "train", ["train", "--config", "{ws}/lora.yaml", "-o", "{out}"], r"lora_r: expected int"),
        c("YAML: max_steps: \"1\"", "train", ["train", "--config", "{ws}/steps.yaml", "-o", "{out}"], r"max_steps: expected int"),
        c("YAML: unknown key", "train", ["train", "--config", "{ws}/unknown.yaml", "-o", "{out}"], r"unknown\.yaml: unknown setting\(s\) learnin_rate"),
        c("YAML: not a mapping", "train", ["train", "--config", "{ws}/list.yaml", "-o", "{out}"], r"list\.yaml: expected a mapping"),
        c("YAML: invalid", "train", ["train", "--config", "{ws}/invalid.yaml", "-o", "{out}"], r"invalid\.yaml: not valid YAML"),
        c("YAML: missing file", "train", ["train", "--config", "{ws}/nofile.yaml", "-o", "{out}"], r"nofile\.yaml: no such file"),
        # ---- train: folders, models and data
        c("resume and overwrite", "train", [*train, "--resume", "--overwrite"], r"--overwrite and --resume"),
        c("resume with nothing to resume", "train", [*train, "--resume"], r"holds no run to resume"),
        c("output dir is a file", "train", ["train", "--model", "{model}", "--data", "{pairs}", "-o", "{ws}/afile"], r"afile is a file", output=""),
        c("output dir not empty", "train", ["train", "--model", "{model}", "--data", "{pairs}", "-o", "{ws}/notempty"], r"notempty is not empty", output=""),
        c("overwrite a folder that is not a run", "train", ["train", "--model", "{model}", "--data", "{pairs}", "-o", "{ws}/notempty", "--overwrite"],
          r"does not look like a dpo-align run folder", output=""),
        c("model folder missing", "train", ["train", "--model", "{ws}/nomodel", "--data", "{pairs}", "-o", "{out}"], r"nomodel: no such model folder"),
        c("model folder without config.json", "train", ["train", "--model", "{ws}/noconfig", "--data", "{pairs}", "-o", "{out}"], r"noconfig: no config\.json"),
        c("truncated model.safetensors", "train", [*train[:2], "{ws}/truncated", *train[3:]], r"truncated/model\.safetensors: truncated or corrupt"),
        c("garbage model.safetensors", "train", [*train[:2], "{ws}/garbage", *train[3:]], r"garbage/model\.safetensors: truncated or corrupt"),
        c("pickle-only model", "train", [*train[:2], "{ws}/pickled", *train[3:]], r"pickled holds weights only as pickle"),
        c("data file missing", "train", ["train", "--model", "{model}", "--data", "{ws}/missing.jsonl", "-o", "{out}"], r"missing\.jsonl: no such file"),
        c("data with a broken line", "train", ["train", "--model", "{model}", "--data", "{ws}/broken.jsonl", "-o", "{out}"], r"broken\.jsonl:2"),
        c("eval data missing", "train", [*train, "--eval-data", "{ws}/missing-eval.jsonl"], r"missing-eval\.jsonl: no such file"),
        c("decontamination data dir missing", "train", [*train, "--data-dir", "{ws}/nodata"], r"nodata/truthfulqa/TruthfulQA\.csv"),
        c("a failed set-up leaves the folder reusable", "train", [*train[:2], "{ws}/truncated", *train[3:-4], "-o", "{ws}/failed-run"],
          r"truncated or corrupt", output="{ws}/failed-run"),
        c("chat template that raises", "train", [*train[:2], "{ws}/refusingchat", *train[3:], "--template", "chat"],
          r"refusingchat's tokenizer fails on a one-message conversation \(TemplateError: Only system roles\.\)"),
        # ---- eval
        c("eval chat template that raises", "eval", ["eval", "{ws}/refusingchat", "--template", "chat", "--data-dir", "{data}", "--dataset",
                                                      "truthfulqa", "-o", "{out}"], r"refusingchat's tokenizer fails on a one-message conversation"),
        c("eval device foo", "eval", [*evaluate, "--device", "foo"], r"--device 'foo'"),
        c("eval device cuda without CUDA", "eval", [*evaluate, "--device", "cuda"], r"--device cuda: this machine has no CUDA"),
        c("eval batch size 0", "eval", [*evaluate, "--batch-size", "0"], r"--batch-size 0"),
        c("eval dtype float8", "eval", [*evaluate, "--dtype", "float8"], r"--dtype 'float8'"),
        c("eval limit 0", "eval", [*evaluate[:-4], "--limit", "0", "-o", "{out}"], r"--limit 0"),
        c("eval limit -1", "eval", [*evaluate[:-4], "--limit", "-1", "-o", "{out}"], r"--limit -1"),
        c("eval unknown dataset", "eval", [*evaluate, "--dataset", "mmlu"], r"--dataset 'mmlu'"),
        c("eval unknown lm-eval model", "eval", [*evaluate, "--lm-eval-model", "vllm"], r"--lm-eval-model 'vllm'"),
        c("eval bad dataset revision", "eval", [*evaluate, "--dataset-revision", "mmlu=abc"], r"--dataset-revision 'mmlu=abc'"),
        c("eval nothing to score", "eval", ["eval", "-o", "{out}"], r"Nothing to score"),
        c("eval model folder missing", "eval", ["eval", "{ws}/nomodel", "-o", "{out}"], r"nomodel: no such model folder"),
        c("eval model without tokenizer", "eval", ["eval", "{ws}/notokenizer", "-o", "{out}"], r"notokenizer: no tokenizer there"),
        c("eval model without config.json", "eval", ["eval", "{ws}/noconfig", "-o", "{out}"], r"noconfig: no config\.json"),
        c("eval truncated model.safetensors", "eval", ["eval", "{ws}/truncated", "-o", "{out}"], r"truncated/model\.safetensors: truncated or corrupt"),
        c("eval pickle-only model", "eval", ["eval", "{ws}/pickled", "-o", "{out}"], r"pickled holds weights only as pickle"),
        c("eval --peft folder missing", "eval", ["eval", "{model}", "--peft", "{ws}/noadapter", "-o", "{out}"], r"--peft .*noadapter: no such folder"),
        c("eval --peft without adapter_config.json", "eval", ["eval", "{model}", "--peft", "{ws}/noconfig", "-o", "{out}"], r"noconfig: no adapter_config\.json"),
        c("eval --peft without weights", "eval", ["eval", "{model}", "--peft", "{ws}/adapter-noweights", "-o", "{out}"],
          r"adapter-noweights: adapter_config\.json is there but no adapter weights"),
        c("eval --peft truncated weights", "eval", ["eval", "{model}", "--peft", "{ws}/adapter-truncated", "-o", "{out}"],
          r"adapter-truncated/adapter_model\.safetensors: truncated or corrupt"),
        c("eval TruthfulQA without Best Answer", "eval", scored_on("nobest", "truthfulqa"),
          r"TruthfulQA\.csv:1: the header has no 'Best Answer'"),
        c("eval empty TruthfulQA.csv", "eval", scored_on("emptycsv", "truthfulqa"),
          r"TruthfulQA\.csv:1: the header has no"),
        c("eval WinoGrande row without option2", "eval", scored_on("nooption2", "winogrande"),
          r"dev\.jsonl:2.*option2"),
        c("eval data dir missing", "eval", scored_on("nodata", "truthfulqa"),
          r"nodata/truthfulqa/TruthfulQA\.csv"),
        c("eval all responses empty", "eval", scored_on("emptyanswers", "truthfulqa"),
          r"truthfulqa: all 2 documents have an empty response"),
        # ---- the controls (dpo_contrast tasks, on by default)
        c("eval TruthfulQA without Incorrect Answers", "eval", scored_on("noincorrect", "truthfulqa"),
          r"truthfulqa: the data has no 'Incorrect Answers' column.*--no-controls"),
        c("eval TruthfulQA whose foils all copy the reference", "eval", scored_on("nofoil", "truthfulqa"),
          r"truthfulqa: no document has a foil"),
        c("sweep TruthfulQA without Incorrect Answers", "sweep", [*sweep, "--data-dir", "{ws}/noincorrect", "--pku-path", "{data}/pku.jsonl.gz",
                                                                   "--max-steps", "1", "--report-generations", "0"],
          r"truthfulqa: the data has no 'Incorrect Answers' column"),
        # ---- merge
        c("merge adapter missing", "merge", ["merge", "{ws}/noadapter", "-o", "{out}"], r"noadapter: no such folder"),
        c("merge without adapter_config.json", "merge", ["merge", "{ws}/noconfig", "-o", "{out}"], r"noconfig: no adapter_config\.json"),
        c("merge adapter without weights", "merge", ["merge", "{ws}/adapter-noweights", "-o", "{out}"], r"adapter-noweights: adapter_config\.json is there"),
        c("merge truncated adapter", "merge", ["merge", "{ws}/adapter-truncated", "-o", "{out}"], r"adapter_model\.safetensors: truncated or corrupt"),
        c("merge base missing", "merge", ["merge", "{ws}/adapter", "--base", "{ws}/nomodel", "-o", "{out}"], r"nomodel: no such model folder"),
        c("merge truncated base", "merge", ["merge", "{ws}/adapter", "--base", "{ws}/truncated", "-o", "{out}"], r"truncated/model\.safetensors: truncated or corrupt"),
        c("merge into a non-empty folder", "merge", ["merge", "{ws}/adapter", "-o", "{ws}/notempty"], r"notempty is not empty", output=""),
        # ---- models prepare
        c("prepare unknown name", "models prepare", ["models", "prepare", "no-such-model"], r"'no-such-model' is neither a built-in model", output=""),
        c("prepare missing folder", "models prepare", ["models", "prepare", "{ws}/nomodel"], r"nomodel: no such model folder", output=""),
        c("prepare a file", "models prepare", ["models", "prepare", "{ws}/afile"], r"afile: a file, not a model folder", output=""),
        # ---- sweep (checked before any training)
        c("sweep lr not a number", "sweep", [*sweep, "--lr", "fast"], r"--lr"),
        c("sweep lr inf", "sweep", [*sweep, "--lr", "1e-5,inf"], r"--lr"),
        # round 4: every run scored as it was trained (a grid over what the scoring holds alike is refused before training)
        c("sweep runs dir equal to the output", "sweep", ["sweep", "--model", "{model}", "--data", "{pairs}", "--runs-dir", "{out}", "-o", "{out}"],
          r"--runs-dir .* is the same folder as --output", output=""),
        c("sweep runs dir inside the output", "sweep", ["sweep", "--model", "{model}", "--data", "{pairs}", "--runs-dir", "{out}/runs", "-o", "{out}"],
          r"--runs-dir .*/runs is inside --output", output=""),
        c("sweep grid over templates", "sweep", [*sweep, "--grid", "template=alpaca,raw"], r"--grid template: every model is scored with one template"),
        c("sweep grid over base models", "sweep", [*sweep, "--grid", "model=smollm2-135m-instruct,{model}"], r"--grid model: every run is compared with one base"),
        c("sweep grid over max length", "sweep", [*sweep, "--grid", "max_length=128,256"], r"--grid max_length: the held-out pairs are cut to one"),
        c("search space over templates", "search", ["search", "--space", "{ws}/template-space.yaml", "--model", "{model}", "--data", "{pairs}",
                                                     "--runs-dir", "{ws}/search-runs", "-o", "{out}"], r"template-space\.yaml: template: every model"),
        c("search space unknown setting", "search", ["search", "--space", "{ws}/unknown-space.yaml", "--model", "{model}", "--data", "{pairs}",
                                                      "--runs-dir", "{ws}/search-runs", "-o", "{out}"], r"unknown-space\.yaml: 'learnin_rate' is not a training setting"),
        c("search storage unreachable", "search", ["search", "--space", "{ws}/good-space.yaml", "--model", "{model}", "--data", "{pairs}",
                                                    "--storage", "postgresql+psycopg://u:pw@127.0.0.1:9/x", "--runs-dir", "{ws}/search-runs", "-o", "{out}"],
          r"--storage postgresql\+psycopg://u:\*\*\*@127\.0\.0\.1:9/x: cannot open the study database"),
        c("sweep eval limit 0", "sweep", [*sweep, "--eval-limit", "0"], r"--limit 0"),
        c("sweep eval batch size 0", "sweep", [*sweep, "--eval-batch-size", "0"],
          r"--batch-size 0"),
        c("sweep save steps 0", "sweep", [*sweep, "--save-steps", "0"], r"--save-steps"),
        c("sweep unknown loss type", "sweep", [*sweep, "--loss-type", "nope"],
          r"--loss-type 'nope'"),
        c("sweep grid over an unknown setting", "sweep", [*sweep, "--grid", "betta=0.1,0.5"], r"'betta' is not a training setting"),
        c("sweep grid value of the wrong type", "sweep", [*sweep, "--grid", "lora_r=four"], r"'four' is not a value of lora_r"),
        c("sweep grid with a duplicate point", "sweep", [*sweep, "--grid", "beta=0.1,0.1"], r"duplicate grid point"),
        c("sweep grid and the option both", "sweep", [*sweep, "--beta", "0.2", "--grid", "beta=0.1,0.5"],
          r"beta: given as an option and in --grid"),
        c("sweep loss weights of the wrong length", "sweep", [*sweep, "--loss-type", "sigmoid,sft", "--loss-weights", "1"],
          r"--loss-weights '1' gives 1 weight\(s\) for 2 loss type\(s\)"),
        c("train loss weights not numbers", "train", [*train, "--loss-type", "sigmoid,sft", "--loss-weights", "1,x"], r"--loss-weights '1,x'"),
        c("train a loss named twice", "train", [*train, "--loss-type", "sigmoid,sigmoid"], r"names a loss twice"),
        # ---- compare, report, generate
        c("compare a missing folder", "compare", ["compare", "{ws}/noresults", "{ws}/noresults2"], r"noresults", output=""),
        c("compare too few draws", "compare", ["compare", "{ws}/noresults", "{ws}/noresults2", "--bootstrap", "10"], r"--bootstrap", output=""),
        c("report a missing folder", "report", ["report", "{ws}/norun"], r"norun: no such folder", output=""),
        c("report negative generations", "report", ["report", "{ws}/notempty", "--generations", "-1"], r"--generations", output=""),
        c("generate unknown format", "generate", ["generate", "{model}", "--prompt", "hi", "--format", "xml"], r"--format 'xml'", output=""),
        c("generate prompt and prompts", "generate", ["generate", "{model}", "--prompt", "hi", "--prompts", "{ws}/p.txt"], r"--prompt or --prompts", output=""),
        c("generate adapter without config", "generate", ["generate", "{model}", "--peft", "{ws}/noconfig", "--prompt", "hi"], r"noconfig: no adapter_config", output=""),
        c("generate prompts file missing", "generate", ["generate", "{model}", "--prompts", "{ws}/nop.txt"], r"nop\.txt", output=""),
        c("generate negative temperature", "generate", ["generate", "{model}", "--prompt", "hi", "--temperature", "-1"], r"--temperature", output=""),
        # ---- issue 20: non-finite and meaningless numbers, refused at the option
        c("generate temperature nan", "generate", ["generate", "{model}", "--prompt", "hi", "--temperature", "nan"],
          r"--temperature must be a finite number \(got nan\)", output=""),
        c("generate temperature inf", "generate", ["generate", "{model}", "--prompt", "hi", "--temperature", "inf"],
          r"--temperature must be a finite number \(got inf\)", output=""),
        c("generate top-p nan", "generate", ["generate", "{model}", "--prompt", "hi", "--temperature", "1", "--top-p", "nan"],
          r"--top-p must be a finite number", output=""),
        c("generate top-p with greedy decoding", "generate", ["generate", "{model}", "--prompt", "hi", "--top-p", "0.5"],
          r"--top-p 0.5 has no effect with greedy decoding", output=""),
        c("generate max-new-tokens past the context", "generate", ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "10000000"],
          r"--max-new-tokens 10000000 is beyond the model's context window of 256", output=""),
        c("generate a prompt longer than the context", "generate", ["generate", "{model}", "--prompts", "{ws}/long-prompt.txt"],
          r"prompt 1 is \d+ tokens once rendered.*context window of 256", output=""),
        c("compare seed -1", "compare", ["compare", "{ws}/noresults", "{ws}/noresults2", "--seed", "-1"], r"--seed -1", output=""),
        c("sweep beta nan", "sweep", [*sweep, "--beta", "nan"], r"--beta must be a finite number"),
        # ---- issue 20: one output-folder rule, before any work
        c("eval output is a file", "eval", [*evaluate[:-1], "{ws}/afile"], r"--output .*afile is a file, not a folder", output=""),
        c("compare output is a file", "compare", ["compare", "{ws}/noresults", "{ws}/noresults2", "-o", "{ws}/afile"],
          r"--output .*afile is a file", output=""),
        c("sweep runs-dir is a file", "sweep", [*sweep[:-4], "--runs-dir", "{ws}/afile", "-o", "{out}"], r"--runs-dir .*afile is a file"),
        c("sweep output is a file", "sweep", [*sweep[:-2], "-o", "{ws}/afile"], r"--output .*afile is a file", output=""),
        c("merge output is a file", "merge", ["merge", "{ws}/adapter", "-o", "{ws}/afile"], r"--output .*afile is a file", output=""),
        c("report output is a folder", "report", ["report", "{ws}/notempty", "-o", "{ws}/notempty"], r"--output .*notempty is a folder", output=""),
        c("generate output is a folder", "generate", ["generate", "{model}", "--prompt", "hi", "-o", "{ws}/notempty"],
          r"--output .*notempty is a folder", output=""),
        # ---- issue 20: one UTF-8 reader, regular files only, each input once
        c("generate Latin-1 prompts", "generate", ["generate", "{model}", "--prompts", "{ws}/latin1.txt"],
          r"latin1\.txt:2: not UTF-8 text \(byte 0xe9 at column 7\)", output=""),
        c("train Latin-1 YAML", "train", ["train", "--config", "{ws}/latin1.yaml", "-o", "{out}"], r"latin1\.yaml:1: not UTF-8 text"),
        c("train empty YAML", "train", ["train", "--config", "{ws}/empty.yaml", "-o", "{out}"], r"--config .*empty\.yaml: the file holds no settings"),
        c("eval Latin-1 TruthfulQA", "eval", scored_on("latin1csv", "truthfulqa"), r"TruthfulQA\.csv:2: not UTF-8 text"),
        c("data inspect a FIFO", "data inspect", ["data", "inspect", "{ws}/fifo.jsonl", "--model", "{model}"], r"fifo\.jsonl: not a regular file", output=""),
        c("train on a FIFO", "train", ["train", "--model", "{model}", "--data", "{ws}/fifo.jsonl", "-o", "{out}"], r"fifo\.jsonl: not a regular file"),
        c("generate prompts from a FIFO", "generate", ["generate", "{model}", "--prompts", "{ws}/fifo.txt"], r"fifo\.txt: not a regular file", output=""),
        c("data inspect a symlink loop", "data inspect", ["data", "inspect", "{ws}/loop.jsonl", "--model", "{model}"],
          r"loop\.jsonl: a broken symbolic link or a link loop", output=""),
        c("data inspect the same file twice", "data inspect", ["data", "inspect", "{pairs}", "{pairs}", "--model", "{model}"],
          r"given twice", output=""),
        c("train on the same file twice", "train", ["train", "--model", "{model}", "--data", "{pairs}", "--data", "{pairs}", "-o", "{out}"], r"given twice"),
        # ---- issue 20: the wrong kind of folder, a model the adapter was not trained on
        c("report a file", "report", ["report", "{ws}/afile"], r"afile: a file, not a folder", output=""),
        c("report an eval folder", "report", ["report", "{ws}/evalfolder"], r"results written by `dpo-align eval`, not a run or a sweep", output=""),
        c("generate an adapter on another base", "generate", ["generate", "{ws}/garbage", "--peft", "{ws}/adapter", "--prompt", "hi"],
          r"--peft .*adapter was trained on .*, and MODEL is .*garbage", output=""),
        # ---- a diverging run is not a success
        c("training diverges (lr 1e30)", "train", [*train[:-4], "--max-steps", "4", "--lr", "1e30", "--logging-steps", "1", "--precision", "fp32",
                                                  "--max-length", "96", "--report-generations", "0"], r"Training diverged at step \d+"),
    ]


CASES = _cases()
OUTCOMES: list[dict] = []


class Workspace:
    """Files the cases point at, made once per test session."""

    def __init__(self, root: Path, model: Path, pairs: Path, data: Path):
        self.root, self.model, self.pairs, self.data = root, model, pairs, data
        (root / "empty.jsonl").write_text("")
        good = pairs.read_text().splitlines()[0]
        (root / "broken.jsonl").write_text(good + "\n{not json\n")
        (root / "norejected.jsonl").write_text(json.dumps({"chosen": json.loads(good)["chosen"]}) + "\n")
        (root / "pairs.txt").write_text(good + "\n")
        (root / "fast.yaml").write_text("learning_rate: fast\n")
        (root / "lora.yaml").write_text("lora_r: [1, 2]\n")
        (root / "steps.yaml").write_text('max_steps: "1"\n')
        (root / "unknown.yaml").write_text("learnin_rate: 1e-5\n")
        (root / "list.yaml").write_text("- 1\n- 2\n")
        (root / "invalid.yaml").write_text("a: [1,\n")
        (root / "afile").write_text("x")
        (root / "latin1.txt").write_bytes("hello\nun caf\xe9 noir\n".encode("latin-1"))
        (root / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
        (root / "empty.yaml").write_text("# nothing here\n")
        (root / "template-space.yaml").write_text("template: [alpaca, raw]\n")
        (root / "unknown-space.yaml").write_text("learnin_rate: {low: 1.0e-5, high: 1.0e-4}\n")
        (root / "good-space.yaml").write_text("learning_rate: {low: 1.0e-5, high: 1.0e-4, log: true}\n")
        (root / "long-prompt.txt").write_text(" ".join(["word"] * 400) + "\n")
        os.mkfifo(root / "fifo.jsonl")
        os.mkfifo(root / "fifo.txt")
        (root / "loop.jsonl").symlink_to(root / "loop.jsonl")
        (root / "evalfolder").mkdir()
        (root / "evalfolder" / "results.json").write_text(json.dumps({"settings": {"command": "dpo-align eval"}, "models": []}))
        (root / "notempty").mkdir()
        (root / "notempty" / "notes.txt").write_text("mine")
        (root / "p.txt").write_text("hi\n")
        (root / "noconfig").mkdir()
        (root / "noconfig" / "model.safetensors").write_bytes(b"")
        for name, damage in (("truncated", "truncate"), ("garbage", "garbage"), ("notokenizer", "tokenizer"), ("pickled", "pickle")):
            folder = root / name
            shutil.copytree(model, folder)
            weights = folder / "model.safetensors"
            if damage == "truncate":
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            elif damage == "garbage":
                weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
            elif damage == "tokenizer":
                for item in folder.iterdir():
                    if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                        item.unlink()
            else:
                weights.unlink()
                (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
        for name, template in (("badchat", "{% if %}{{ messages }}"), ("refusingchat", "{{ raise_exception('Only system roles.') }}")):
            shutil.copytree(model, root / name)  # a chat template that does not parse, and one that raises on a user message
            (root / name / "chat_template.jinja").write_text(template)
        self._adapter()
        self._scoring_data()

    def _adapter(self) -> None:
        noisy_adapter(self.model, self.root / "adapter")
        for name in ("adapter-noweights", "adapter-truncated"):
            shutil.copytree(self.root / "adapter", self.root / name)
        (self.root / "adapter-noweights" / "adapter_model.safetensors").unlink()
        weights = self.root / "adapter-truncated" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    def _scoring_data(self) -> None:
        for name, header, rows in (("nobest", ["Type", "Question"], [["A", "Why?"]]), ("emptycsv", None, []),
                                   ("emptyanswers", ["Question", "Best Answer"], [["Why?", ""], ["How?", "  "]]),
                                   ("noincorrect", ["Question", "Best Answer"], [["Why?", "Because."]]),
                                   ("nofoil", ["Question", "Best Answer", "Incorrect Answers"], [["Why?", "Because.", "Because.; "]])):
            (self.root / name / "truthfulqa").mkdir(parents=True)
            with open(self.root / name / "truthfulqa" / "TruthfulQA.csv", "w", newline="") as f:
                if header:
                    csv.writer(f).writerows([header, *rows])
        (self.root / "latin1csv" / "truthfulqa").mkdir(parents=True)
        (self.root / "latin1csv" / "truthfulqa" / "TruthfulQA.csv").write_bytes(
            "Question,Best Answer,Incorrect Answers\nWhere is the caf\xe9?,Here.,There.\n".encode("latin-1"))
        (self.root / "nooption2" / "winogrande").mkdir(parents=True)
        rows = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}, {"sentence": "A _ b.", "option1": "x", "answer": "1"}]
        (self.root / "nooption2" / "winogrande" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def fill(self, text: str, out: Path) -> str:
        return text.format(ws=self.root, model=self.model, pairs=self.pairs, data=self.data, out=out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_gpt2, pairs_file, tiny_data) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad-inputs"), tiny_gpt2, pairs_file, tiny_data)


class ForkServer:
    """tests/cli_forkserver.py: each command line in its own forked process, without paying the imports each time."""

    def __init__(self, folder: Path):
        self.folder = folder
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_forkserver.py"))], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.count = 0

    def run(self, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        self.process.stdin.write(json.dumps({"args": args, "env": env or {}, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError("the fork server died")
        return subprocess.CompletedProcess(args, json.loads(reply)["code"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("cli-output"))
    yield server
    server.close()


def outcome(case: Case, result: subprocess.CompletedProcess, leftovers: list[str]) -> str:
    text = result.stdout + result.stderr
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if result.returncode == 0:
        return "silent"
    if result.returncode != case.code or not re.search(case.message, text, re.S):
        return "unclear"
    if leftovers:
        return "left behind"
    return "clean"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, workspace: Workspace, cli: ForkServer, tmp_path):
    out = tmp_path / "out"
    args = [workspace.fill(a, out) for a in case.args]
    started = time.perf_counter()
    result = cli.run(args, case.extra_env)
    folder = Path(workspace.fill(case.output, out)) if case.output else None
    leftovers = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name in FINISHED) if folder and folder.is_dir() else []
    verdict = outcome(case, result, leftovers)
    text = (result.stdout + result.stderr).strip()
    lines = text.splitlines()
    # the line that says what went wrong (the message searched for), else the last one
    shown = next((line for line in lines if re.search(case.message, line)), lines[-1] if lines else "")
    for path, name in ((workspace.root, "WS"), (out, "OUT"), (workspace.model, "MODEL"), (workspace.pairs, "PAIRS")):
        shown = shown.replace(str(path), name)
    OUTCOMES.append({"case": case.name, "command": case.command, "exit": result.returncode, "outcome": verdict,
                     "message": shown.strip("│ ")[:220],
                     "seconds": round(time.perf_counter() - started, 1)})
    assert verdict == "clean", f"{verdict}: exit {result.returncode}, leftovers {leftovers}\n{text[-3000:]}"
    if case.name == "a failed set-up leaves the folder reusable":
        assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 60


@pytest.fixture(scope="module", autouse=True)
def reliability_report():
    yield
    target = os.environ.get("DPO_ALIGN_RELIABILITY_MD")
    if target and OUTCOMES:
        Path(target).write_text(render(OUTCOMES))


def render(outcomes: list[dict]) -> str:
    import platform
    from collections import Counter

    counts = Counter(o["outcome"] for o in outcomes)
    lines = ["# Reliability: bad inputs and faults against every command", "",
             "Generated by `tests/test_bad_inputs.py` from its own outcomes (do not edit by hand):", "",
             "    DPO_ALIGN_RELIABILITY_MD=results/reliability.md python -m pytest tests/test_bad_inputs.py", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, Python {platform.python_version()}. Each case is a real "
             "`dpo-align` command line in a fresh process (HF_HUB_OFFLINE=1). A case is *clean* when it exits with the "
             "expected code (2), prints no traceback, names the file, line or option, and leaves nothing that looks finished "
             f"({', '.join(FINISHED)}) in its output folder.", "",
             "| outcome | cases |", "|---|---|"]
    for name in ("clean", "traceback", "silent", "unclear", "left behind"):
        lines.append(f"| {name} | {counts.get(name, 0)} |")
    lines += ["", f"{len(outcomes)} cases in all.", "", "| command | case | exit | outcome | the line naming the problem |", "|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o['command']} | {o['case']} | {o['exit']} | {o['outcome']} | `{o['message'].replace('|', '/')}` |")
    return "\n".join(lines) + "\n"


def test_the_fork_server_answers_as_the_installed_command_does(cli, tmp_path):
    """Same exit code and message as a plain `python -m dpo_align.cli` process; an uncaught
    exception (--debug re-raises) is seen as a traceback, so the classification can fail."""
    args = ["train", "--lr", "inf", "-o", str(tmp_path / "x")]
    plain = subprocess.run([sys.executable, "-m", "dpo_align.cli", *args], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}, timeout=300)
    forked = cli.run(args)
    assert (forked.returncode, forked.stderr.strip()) == (plain.returncode, plain.stderr.strip()) and plain.returncode == 2
    debug = cli.run(["--debug", *args])
    assert outcome(CASES[0], debug, []) == "traceback" and debug.returncode == 1


def test_lm_eval_itself_ends_with_the_same_message(workspace, tmp_path):
    """Malformed scoring data through plain `lm_eval`: its last line is the message naming file:line and column."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={workspace.model}", "--include_path",
         str(repo / "lm_eval_tasks"), "--tasks", "dpo_ppl_truthfulqa", "--metadata", json.dumps({"data_dir": str(workspace.root / "nobest")}),
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    text = result.stdout + result.stderr
    last = text.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in text, text[-3000:]  # the boundary: one line, as dpo-align's commands
    assert re.search(r"^error: .*nobest/truthfulqa/TruthfulQA\.csv:1: the header has no 'Best Answer' column", last), last
    assert not list((tmp_path / "out").rglob("results_*.json")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("entry, metadata, message", [
    ("lm_eval", {"data_dri": "DATA"}, r"unknown key 'data_dri' \(did you mean 'data_dir'\?\)"),
    ("dpo-lm-eval", {"data_dri": "DATA"}, r"unknown key 'data_dri' \(did you mean 'data_dir'\?\)"),
    ("dpo-lm-eval", {"data_dir": "WS/nodata"}, r"nodata/truthfulqa/TruthfulQA\.csv"),
    ("dpo-lm-eval", [1, 2], r"--metadata .*a JSON object is needed"),
    ("dpo-lm-eval --batch_size auto", {"data_dir": "DATA"}, r"--batch_size auto: on a CPU lm-eval's probe runs forward passes"),
], ids=["lm_eval misspelt key", "dpo-lm-eval misspelt key", "dpo-lm-eval data dir missing",
        "dpo-lm-eval metadata not an object", "dpo-lm-eval batch size auto on a CPU"])
def test_errors_inside_lm_eval_are_one_line_and_exit_2(entry, metadata, message, workspace, tmp_path):
    """The task code's errors end plain `lm_eval` and `dpo-lm-eval` alike in one clean line naming the option, exit 2;
    a misspelt --metadata key is refused instead of quietly falling back to the hub's copy of the data."""
    repo = Path(__file__).resolve().parents[1]
    text = json.dumps(metadata).replace("WS", str(workspace.root)).replace("DATA", str(workspace.data))
    program = [sys.executable, "-m", "lm_eval"] if entry == "lm_eval" else [sys.executable, "-m", "dpo_align.score.lm_eval_cli"]
    extra = ["--batch_size", "auto"] if entry.endswith("auto") else []
    result = subprocess.run(
        [*program, "--model", "hf", "--model_args", f"pretrained={workspace.model}", "--include_path", str(repo / "lm_eval_tasks"),
         "--tasks", "dpo_ppl_truthfulqa", "--metadata", text, "--output_path", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert re.search(message, output.strip().splitlines()[-1]), output[-1000:]


REMOTE_CODE = """
import pathlib, os
pathlib.Path(os.environ["DPO_ALIGN_REMOTE_MARKER"]).write_text("remote code ran")
from transformers import PreTrainedTokenizerFast


class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("value, runs", [("false", False), (0, False), (True, True)], ids=["string false", "number 0", "JSON true (the control)"])
def test_only_a_json_true_lets_a_tokenizer_run_its_own_code(value, runs, workspace, tmp_path):
    """A tokenizer folder that ships code (``auto_map``) and writes a marker file when that code is imported, named
    by --metadata: the string "false" once ran it (``bool("false")`` is True). Now only a JSON ``true`` runs it, which
    the control shows (the marker appears); any non-boolean is a clean error naming trust_remote_code, exit 2."""
    repo = Path(__file__).resolve().parents[1]
    folder = tmp_path / "remote-tokenizer"
    shutil.copytree(workspace.model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "marker_tokenizer.MarkerTokenizer"]}
    config["tokenizer_class"] = "MarkerTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "marker_tokenizer.py").write_text(REMOTE_CODE)
    marker = tmp_path / "marker.txt"
    metadata = {"tokenizer": str(folder), "trust_remote_code": value, "data_dir": str(workspace.data)}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={workspace.model}", "--include_path",
         str(repo / "lm_eval_tasks"), "--tasks", "dpo_ppl_truthfulqa", "--limit", "1", "--metadata", json.dumps(metadata),
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "DPO_ALIGN_REMOTE_MARKER": str(marker),
                                             "HF_MODULES_CACHE": str(tmp_path / "modules")}, timeout=600)
    output = result.stdout + result.stderr
    assert marker.exists() == runs, output[-3000:]
    if not isinstance(value, bool):
        assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
        assert re.search(r"trust_remote_code is .*it takes a boolean", output.strip().splitlines()[-1]), output[-1000:]


# --------------------------------------------------------------------------- in-process: settings, diverging runs, broken data
# (what was tests/test_bad_settings.py: checked through Typer's runner, with the assertions those cases had)

runner = CliRunner()

SETTING_CASES = [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--beta", "inf"], "--beta must be a finite number"),
    (["--loss-type", "unknown"], "--loss-type 'unknown' is not one of TRL's"),
    (["--logging-steps", "0"], "--logging-steps must be at least 1"),
    (["--eval-steps", "0"], "--eval-steps must be at least 1"),
    (["--save-steps", "0"], "--save-steps must be a whole number"),
    (["--pair-sample", "shuffled"], "--pair-sample must be one of first, random"),
    (["--report-generations", "-1"], "--report-generations must be 0"),
]
YAML_CASES = [
    ("learning_rate: fast\n", "learning_rate: expected float, got 'fast'"),
    ("lora_r: [1, 2]\n", "lora_r: expected int, got [1, 2]"),
    ('max_steps: "1"\n', "max_steps: expected int, got '1'"),
    ("data: [1, 2]\n", "data: expected a list of strings"),
    ("save_total_limit: 0\n", "save_total_limit must be at least 1"),
]


@pytest.mark.parametrize(("args", "message"), SETTING_CASES)
def test_bad_options_are_refused_before_anything_is_written(args, message, tmp_path, pairs_file):
    out = tmp_path / "run"
    # the model does not exist: a model load would fail differently, so the settings were checked first
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "no-model"), "--data", str(pairs_file), "-o", str(out), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(("text", "message"), YAML_CASES)
def test_yaml_values_of_the_wrong_type_name_their_key(text, message, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["train", "--config", str(config), "--model", str(tmp_path / "m"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_diverging_run_stops_with_exit_2_and_leaves_nothing_finished(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(out), "--lr", "1e30",
                                 "--max-steps", "6", "--logging-steps", "1", "--precision", "fp32", "--max-length", "96",
                                 "--report-generations", "0"])
    assert result.exit_code == 2 and "Training diverged at step" in result.output and "Traceback" not in result.output, result.output
    assert not (out / "manifest.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_a_sweep_marks_a_diverging_run_failed_and_scores_the_others(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    result = runner.invoke(app, ["sweep", "--lr", "1e-3,1e30", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "4",
                                 "--max-length", "96", "--precision", "fp32", "--data-dir", str(tiny_data),
                                 "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--eval-limit", "2", "--bootstrap", "100",
                                 "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "1 of 2 runs failed (lr-1e+30)" in result.output
    table = (tmp_path / "out" / "table.md").read_text()
    assert "DPO lr 0.001" in table and "## Failed runs" in table and "lr-1e+30: Training diverged at step" in table
    assert "nan ±" not in table and "DPO lr 1e+30" not in table  # the failed run has no column
    models = json.loads((tmp_path / "out" / "results.json").read_text())["models"]
    assert [m["label"] for m in models] == [models[0]["label"], "DPO lr 0.001"]


EVAL_CASES = [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--limit", "0"], "--limit 0"),
    (["--limit", "-1"], "--limit -1"),
    (["--dtype", "float8"], "--dtype 'float8' is not one of"),
    (["--device", "foo"], "--device 'foo' is not one of"),
    (["--device", "cuda"], "no CUDA device"),
]


@pytest.mark.parametrize(("args", "message"), EVAL_CASES)
def test_bad_eval_options_are_refused_before_a_model_loads(args, message, tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_sweep_checks_its_scoring_options_before_training(tmp_path, pairs_file):
    result = runner.invoke(app, ["sweep", "--data", str(pairs_file), "--eval-batch-size", "0", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--batch-size 0" in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("name", "message"), [("no-such-model", "neither a built-in model"), ("/nonexistent/model", "no such model folder"),
                                               ("nobody/nothing", "Could not get 'nobody/nothing'")])
def test_models_prepare_refuses_what_it_cannot_prepare(name, message, tmp_path):
    result = runner.invoke(app, ["models", "prepare", name])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_folder_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["models", "prepare", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no config.json" in result.output


def _suite(tmp_path, truthfulqa: str, winogrande: str):
    (tmp_path / "truthfulqa").mkdir(parents=True)
    (tmp_path / "truthfulqa" / "TruthfulQA.csv").write_text(truthfulqa)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(winogrande)
    return tmp_path


GOOD_TQA = "Type,Category,Question,Best Answer\nA,B,What is it?,It is.\n"
GOOD_WINO = json.dumps({"sentence": "The fox is _.", "option1": "quick", "option2": "slow", "answer": "1"}) + "\n"


@pytest.mark.parametrize(("tqa", "wino", "message"), [
    ("Type,Category,Question\nA,B,What is it?\n", GOOD_WINO, "TruthfulQA.csv:1: the header has no 'Best Answer' column"),
    ("", GOOD_WINO, "TruthfulQA.csv:1: the header has no 'Question' or 'Best Answer' column"),
    ("Type,Category,Question,Best Answer\n", GOOD_WINO, "TruthfulQA.csv: no rows after the header"),
    (GOOD_TQA, GOOD_WINO + json.dumps({"sentence": "x _", "option1": "a", "answer": "1"}) + "\n", "dev.jsonl:2: missing or non-text field(s) option2"),
    (GOOD_TQA, "{not json\n", "dev.jsonl:1: not valid JSON"),
])
def test_malformed_scoring_data_names_the_file_line_and_column(tqa, wino, message, tmp_path):
    from dpo_align.core.errors import UserError
    from dpo_align.data.suite_docs import load_docs

    data = _suite(tmp_path / "suite", tqa, wino)
    with pytest.raises(UserError, match=re_escape(message)):
        load_docs("truthfulqa", data_dir=str(data))
        load_docs("winogrande", data_dir=str(data))


def re_escape(text):
    import re

    return re.escape(text)


def test_empty_responses_are_skipped_and_counted(tiny_gpt2, tmp_path):
    data = _suite(tmp_path / "suite", "Type,Category,Question,Best Answer\nA,B,What is it?,It is.\nA,B,Empty?,\nA,B,Blank?,  \n", GOOD_WINO)
    pku = tmp_path / "pku.jsonl"
    pku.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}) + "\n")
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(data), "--pku-path", str(pku), "--device", "cpu",
                                 "--no-controls", "-o", str(tmp_path / "out")])  # this TruthfulQA.csv has no Incorrect Answers
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["table"]
    assert table["truthfulqa"]["n"] == 1 and table["truthfulqa"]["skipped_empty_responses"] == 2
    assert table["winogrande"]["skipped_empty_responses"] == 0
    # every answer empty: nothing to score is an error, not a ce of the separator alone
    data2 = _suite(tmp_path / "suite2", "Type,Category,Question,Best Answer\nA,B,Empty?,\n", GOOD_WINO)
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(data2), "--pku-path", str(pku), "--device", "cpu",
                                 "--no-controls", "-o", str(tmp_path / "out2")])
    assert result.exit_code == 2 and "truthfulqa: all 1 documents have an empty response" in result.output
    assert not (tmp_path / "out2" / "results.json").exists()


def test_a_data_folder_warns_about_the_files_it_ignores(tmp_path, pairs_file):
    from dpo_align.data.pairs import read_pairs

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text(pairs_file.read_text())
    (folder / "more.csv").write_text("chosen,rejected\n")
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden").write_text("x")
    with pytest.warns(UserWarning, match=r"ignoring 2 file\(s\) that are not data files .*: more.csv, notes.txt$"):
        pairs, _ = read_pairs([str(folder)])
    assert len(pairs) == 48


# --------------------------------------------------------------------------- issue 20: good inputs handled right


def test_an_adapter_given_beside_another_base_is_scored_on_its_own_and_labelled_with_it(tiny_gpt2, tiny_data, tmp_path):
    """eval OTHER --peft ADAPTER: the adapter is scored on the base it was trained on, its row names that base, and a
    warning says the change compares two bases; its template is checked against the one it was trained with; and a
    --limit above a set's size records what was scored."""
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_gpt2, other)
    adapter = noisy_adapter(tiny_gpt2, tmp_path / "adapter")
    (adapter / "config.yaml").write_text("template: chat\n")  # as `dpo-align train` writes it
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(other), "--peft", str(adapter), "--data-dir", str(tiny_data), "--pku-path",
                                 str(tiny_data / "pku.jsonl.gz"), "--limit", "100000", "--no-controls", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"was trained on {tiny_gpt2}, not on {other}" in result.output
    assert "was trained with template 'chat' and is used here with 'alpaca'" in result.output
    results = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in results["models"]] == ["other-model", f"adapter (LoRA on {Path(tiny_gpt2).name})"]
    assert results["models"][1]["pretrained"] == str(tiny_gpt2)
    scored = results["settings"]["documents_scored"]
    assert scored and all(0 < n < 100000 for n in scored.values()) and "--limit 100000 is above the size of" in result.output
    for task, n in scored.items():
        assert len((out / "samples" / "other-model" / f"{task}.jsonl").read_text().splitlines()) == n


def test_report_refuses_a_folder_another_command_is_writing(tmp_path):
    from dpo_align.core.folder_lock import locked

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    with locked(run, "dpo-align train"):
        result = runner.invoke(app, ["report", str(run), "--generations", "0"])
    assert result.exit_code == 2 and "is in use by" in result.output and "dpo-align train" in result.output
    assert not (run / "report.html").exists()


def test_a_yaml_exponent_without_a_dot_is_the_number_it_looks_like(tmp_path):
    """YAML 1.1 reads `1e-5` as a string; the tool writes 1.0e-05 itself and reads either back as the same float."""
    from dpo_align.train.config import load_config_file

    (tmp_path / "a.yaml").write_text("learning_rate: 1e-5\nbeta: 5E-2\n")
    (tmp_path / "b.yaml").write_text("learning_rate: 1.0e-05\nbeta: 0.05\n")
    assert load_config_file(tmp_path / "a.yaml") == load_config_file(tmp_path / "b.yaml") == {"learning_rate": 1e-5, "beta": 0.05}
    (tmp_path / "c.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(Exception, match="learning_rate: expected float"):
        from dpo_align.train.config import build_config

        build_config(load_config_file(tmp_path / "c.yaml"), {})


# --------------------------------------------------------------------------- round 4: caches and records keyed on content


def test_caches_and_finished_runs_are_reused_only_for_the_same_content(cli, tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """Real sweep command lines, each in a fresh process: a scoring file replaced in place, the data folder moved by
    DPO_ALIGN_DATA_DIR, other held-out pairs of the same count, the training data replaced, two adapters swapped. Each
    is noticed: re-scored (with the new numbers), or refused with the file named, never "kept" with the old results."""
    data, held, train = tmp_path / "data", tmp_path / "held.jsonl", tmp_path / "train.jsonl"
    shutil.copytree(tiny_data, data)
    rows = pairs_file.read_text().splitlines()
    held.write_text("\n".join(rows[:6]) + "\n")
    train.write_text("\n".join(rows) + "\n")
    args = ["sweep", "--lr", "1e-3,5e-2", "--model", str(tiny_gpt2), "--data", str(train), "--max-steps", "2", "--max-length", "96",
            "--precision", "fp32", "--pku-path", str(data / "pku.jsonl.gz"), "--preference-data", str(held), "--report-generations", "0",
            "--bootstrap", "100", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out")]
    env = {"DPO_ALIGN_DATA_DIR": str(data)}  # the data folder from the environment, not --data-dir
    first = cli.run(args, env)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["data_dir_read"] == str(data) and results["settings"]["inputs"]["data_dir"]["path"] == str(data.resolve())
    tqa_ce = results["models"][0]["table"]["truthfulqa"]["ce"][0]

    # 1. TruthfulQA's file replaced in place (other answers): every model is scored again, on the new file
    csv_path = data / "truthfulqa" / "TruthfulQA.csv"
    csv_path.write_text(csv_path.read_text().replace("Paris is the capital.", "The capital of France is Paris, a large city."))
    replaced = cli.run(args, env)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "already scored, kept" not in replaced.stderr and replaced.stderr.count("its data_dir is not the one it was made from") == 3
    new_ce = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["table"]["truthfulqa"]["ce"][0]
    assert new_ce != tqa_ce

    # 2. DPO_ALIGN_DATA_DIR pointed at another folder with other content: scored again, and the folder read is recorded
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    (other / "winogrande" / "dev.jsonl").write_text((other / "winogrande" / "dev.jsonl").read_text().replace("quick", "fast"))
    moved = cli.run(args, {"DPO_ALIGN_DATA_DIR": str(other)})
    assert moved.returncode == 0 and moved.stderr.count("its data_dir is not the one it was made from") == 3, moved.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["data_dir_read"] == str(other)

    # 3. other held-out pairs, the same count: the held-out log-probs are computed again (only the count was compared)
    held.write_text("\n".join(rows[10:16]) + "\n")
    pairs = cli.run(args, {"DPO_ALIGN_DATA_DIR": str(other)})
    assert pairs.returncode == 0 and pairs.stderr.count("its sources is not the one it was made from") == 3, pairs.stderr[-3000:]

    # 4. two runs' adapters swapped: refused before anything is scored, naming the file
    a, b = (tmp_path / "runs" / name / "adapter_model.safetensors" for name in ("lr-0.001", "lr-0.05"))
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    swapped = cli.run(args, {"DPO_ALIGN_DATA_DIR": str(other)})
    assert swapped.returncode == 2 and "Traceback" not in swapped.stderr
    assert re.search(r"lr-0\.001: finished earlier, but its adapter_model\.safetensors is not the file the run wrote", swapped.stderr)
    a.write_bytes(a_bytes)
    b.write_bytes(b_bytes)

    # 5. the training data replaced in place: the finished runs are not "kept" for the new data
    train.write_text("\n".join(rows[::-1]) + "\n")
    retrained = cli.run(args, {"DPO_ALIGN_DATA_DIR": str(other)})
    assert retrained.returncode == 2 and "already finished, kept" not in retrained.stderr
    assert re.search(r"finished earlier, but its training data \(.*train\.jsonl\) is not what it trained on", retrained.stderr)


def test_a_sweeps_config_file_learning_rate_is_the_one_it_trains(cli, tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """`sweep --config` with a learning rate and no --lr/--grid trains that rate (it trained the default 5e-6 and 1e-5
    without a word, while the file's beta was applied)."""
    (tmp_path / "cfg.yaml").write_text("learning_rate: 2.0e-3\nbeta: 0.25\n")
    result = cli.run(["sweep", "--config", str(tmp_path / "cfg.yaml"), "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "1",
                      "--max-length", "96", "--precision", "fp32", "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
                      "--eval-limit", "1", "--report-generations", "0", "--bootstrap", "100", "--runs-dir", str(tmp_path / "runs"),
                      "-o", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["lr-0.002"]
    saved = (tmp_path / "runs" / "lr-0.002" / "config.yaml").read_text()
    assert "learning_rate: 0.002" in saved and "beta: 0.25" in saved


@pytest.mark.parametrize("options, message", [
    (["--system_instruction", "Answer briefly."], r"--system_instruction changes every prompt the suite scores"),
    (["--cache_requests", "true"], r"--cache_requests restores requests keyed on the task's name, not on its data files"),
    (["--use_cache", "{tmp}/responses"], r"--use_cache returns the responses stored for the same request text, whatever the model's weights"),
], ids=["system instruction", "request cache", "response cache"])
def test_lm_eval_options_that_change_the_measure_are_refused(options, message, workspace, tmp_path):
    """Plain `lm_eval` with an option that would change what the suite measures (or serve old requests for changed
    data): one clean line naming the option, exit 2, no results file."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={workspace.model}", "--include_path",
         str(repo / "lm_eval_tasks"), "--tasks", "dpo_ppl_truthfulqa", "--limit", "1", "--metadata", json.dumps({"data_dir": str(workspace.data)}),
         "--output_path", str(tmp_path / "out"), *(option.format(tmp=tmp_path) for option in options)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert re.search(message, output.strip().splitlines()[-1]), output[-1000:]
    assert not list(tmp_path.rglob("results_*.json"))


def test_an_adapter_whose_config_lists_fewer_modules_than_its_weights_is_refused(tiny_gpt2, tiny_data, tmp_path):
    """adapter_config.json listing only one of the modules its weights adapt: PEFT would load that one and drop the rest
    (a smaller adapter, scored under the whole one's name). eval refuses it, naming the modules left out."""
    adapter = noisy_adapter(tiny_gpt2, tmp_path / "adapter")
    config_path = Path(adapter) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    targets = sorted(config["target_modules"])
    assert len(targets) > 1
    config["target_modules"] = targets[:1]
    config_path.write_text(json.dumps(config))
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--peft", str(adapter), "--data-dir", str(tiny_data), "--limit", "1",
                                 "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "its weights adapt c_attn, c_fc, c_proj, which adapter_config.json's target_modules" in result.output
    assert f"({targets[0]}) does not list" in result.output
    assert not (tmp_path / "out" / "results.json").exists()


def test_loading_failure_hints_name_the_cause_the_error_shows(tmp_path):
    """The hints of a loading failure: a LoRA rank mismatch is the adapter's own config, a missing shard an incomplete
    copy, and only a folder of pickle weights gets --allow-pickle (each once got another's hint)."""
    from dpo_align.score.evaluate import ModelSpec, failure_hint

    spec = ModelSpec("m", str(tmp_path))
    rank = "Error(s) in loading state_dict for PeftModel: size mismatch for base_model.model.h.0.attn.c_attn.lora_A.default.weight: ..."
    assert "adapter_config.json gives them" in failure_hint(rank, spec, False)
    assert "belong to this base" in failure_hint("size mismatch for transformer.wte.weight: copying a param", spec, False)
    shard = "model-00002-of-00002.safetensors not found in /some/folder"
    assert "weight file the checkpoint names is missing" in failure_hint(shard, spec, False)
    assert failure_hint("an error about safetensors headers", spec, False) == ""  # no pickle files: no pickle hint
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert "--allow-pickle" in failure_hint("an error about safetensors headers", spec, False)


def _with_window(model: Path, folder: Path, positions: int) -> Path:
    """A copy of a tiny Llama whose config says it has ``positions`` positions (RoPE: the weights do not change)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_prompts_cut_to_fit_the_window_are_counted_and_shown(tiny_llama, tiny_data, tmp_path):
    """A model of 80 positions: two of TruthfulQA's three alpaca prompts (71, 88 and 96 tokens with their responses) are cut
    from the left by lm-eval. Counted per dataset in results.json, shown in table.md and on the terminal; the 71-token
    one is not."""
    model = _with_window(tiny_llama, tmp_path / "short", 80)
    result = runner.invoke(app, ["eval", str(model), "--dataset", "truthfulqa", "--data-dir", str(tiny_data), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["table"]["truthfulqa"]
    assert row["n"] == 3 and row["truncated"][0] == pytest.approx(2 / 3)
    assert row["truncated_controls"][0] >= row["truncated"][0]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## Truncated prompts" in table and "references: 2 of 3" in table
    assert "references: 2 of 3" in result.output
    # the same model with its full window: nothing cut, no section
    full = runner.invoke(app, ["eval", str(tiny_llama), "--dataset", "truthfulqa", "--data-dir", str(tiny_data), "-o", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    assert json.loads((tmp_path / "full" / "results.json").read_text())["models"][0]["table"]["truthfulqa"]["truncated"][0] == 0
    assert "Truncated prompts" not in (tmp_path / "full" / "table.md").read_text()


def test_a_response_longer_than_the_window_is_a_clear_error(tiny_llama, tiny_data, tmp_path):
    """20 positions against responses of 26 and 28 tokens: lm-eval would stop on an AssertionError mid-scoring. One line
    naming the document and both sizes, exit 2, no results."""
    model = _with_window(tiny_llama, tmp_path / "tiny", 20)
    result = runner.invoke(app, ["eval", str(model), "--dataset", "truthfulqa", "--data-dir", str(tiny_data), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output and "AssertionError" not in result.output
    assert re.search(r"document \d's response is 2[68] tokens, longer than the 20 positions the model scores", result.output), result.output
    assert not (tmp_path / "out").exists()
