"""`dpo-align report`: a self-contained page that renders in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.report.html import write_report_safely
from dpo_align.score.generate import report_generations
from dpo_align.train.run import train

from .helpers import tiny_config

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Debian's chromium (.ci/run): there, its absence is a failure, not a skip.
needs_chromium = pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="chromium is not installed")

PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute('data-probe', `images=${images.length};broken=${broken}`);
});</script>"""


def open_in_chromium(page, tmp_path) -> tuple[int, int, list[str], str]:
    """Load a copy of the page with a probe script: (images, broken images, console messages, DOM)."""
    assert CHROMIUM, "chromium is not installed (CI installs Debian's chromium package)"
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="images=(\d+);broken=(\d+)"', done.stdout)
    assert found, f"the page did not finish loading: {done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return int(found[1]), int(found[2]), console, done.stdout


@needs_chromium
def test_the_probe_catches_a_broken_image_and_a_console_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    images, broken, console, _ = open_in_chromium(page, tmp_path)
    assert (images, broken) == (1, 1) and any("boom" in line for line in console)


@needs_chromium
def test_a_training_run_writes_a_report_that_renders(tiny_gpt2, pairs_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_gpt2, pairs_file, run, max_steps=4, eval_data=[str(pairs_file)], eval_max_pairs=8, eval_steps=2,
                      report_generations=2),
          progress=lambda m: None)
    write_report_safely(run, lambda m: None, generations=2, generate=report_generations)  # as `dpo-align train` does after training
    page = run / "report.html"
    text = page.read_text()
    assert "https://" not in text and "http://" not in text and "<script" not in text  # self-contained, nothing to fetch
    for section in ("Summary", "Final DPO statistics", "Training curves", "Generations, side by side", "Configuration"):
        assert f">{section}</h2>" in text
    images, broken, console, dom = open_in_chromium(page, tmp_path)
    assert images >= 5 and broken == 0 and console == []
    assert "Training curves" in dom  # rendered
    markdown = (run / "report.md").read_text()
    assert "## Training curves" in markdown and len(re.findall(r"!\[[^]]*\]\(report-images/[^)]+\.png\)", markdown)) == images
    assert all((run / "report-images" / name).is_file() for name in re.findall(r"\(report-images/([^)]+)\)", markdown))
    # the generations are the base model's beside the adapter's, and cached for a rebuild
    assert "adapter " in markdown and (run / "generations.json").is_file()
    result = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "again.html"), "--generations", "0"])
    assert result.exit_code == 0, result.output
    assert "Generations" not in (tmp_path / "again.html").read_text()


def test_report_refuses_a_folder_that_is_neither(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a training run" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no such folder" in result.output


def test_the_learning_rate_is_shown_as_written(tmp_path):
    from dpo_align.report.html import run_blocks, to_markdown

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: m\nlearning_rate: 1.0e-05\nbeta: 0.1\n")
    markdown, _ = to_markdown(run_blocks(run, generations=0))
    assert "| learning rate | 1e-05 |" in markdown and "0.0000" not in markdown


def test_training_curves_are_smoothed_as_tensorboard_does():
    from dpo_align.core.plots import smoothed

    values = [1.0, 0.0, 1.0, 0.0]
    out = smoothed(values, weight=0.6)
    assert out[0] == 1.0  # debiased: the first point is itself, not pulled towards 0
    assert out[1] == pytest.approx((0.6 * 0.4 * 1.0 + 0.4 * 0.0) / (1 - 0.36))
    assert max(out[1:]) - min(out[1:]) < max(values) - min(values)  # the swing shrinks


def test_the_reference_log_prob_comes_from_what_trl_logs():
    from dpo_align.core.plots import reference_series

    # reward = beta * (policy - reference): policy -10 with reward 0.2 at beta 0.1 means a reference of -12
    rows = [{"step": 1, "logps/chosen": -10.0, "rewards/chosen": 0.2}, {"step": 2, "loss": 0.69}, {"step": 3, "logps/chosen": -9.0, "rewards/chosen": -0.1}]
    assert reference_series(rows, "chosen", 0.1) == ([1, 3], [pytest.approx(-12.0), pytest.approx(-8.0)])
