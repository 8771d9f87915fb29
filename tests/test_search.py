"""`dpo-align search`: a study trains what Optuna draws, scores it by its controlled verdict, prunes on the learning
curve, and many workers share one database (SQLite here; PostgreSQL, with two worker processes and a SIGKILL, below)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.core.errors import UserError
from dpo_align.search.space import load_space
from dpo_align.train.config import TrainConfig

runner = CliRunner()
SPACE = "learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\nloss_type: [sigmoid, ipo]\n"


def search_args(model, pairs, data, tmp_path, *extra, steps: int = 4) -> list[str]:
    return ["search", "--space", str(tmp_path / "space.yaml"), "--model", str(model), "--data", str(pairs), "--max-steps", str(steps),
            "--data-dir", str(data), "--pku-path", str(data / "pku.jsonl.gz"), "--preference-data", str(data / "pku.jsonl.gz"),
            "--search-pairs", "2", "--search-docs", "2", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out"), *extra]


def load(tmp_path, name="dpo-align", url=None):
    import optuna

    return optuna.load_study(study_name=name, storage=url or f"sqlite:///{tmp_path / 'out' / 'study.db'}")


# --------------------------------------------------------------------------- the space


@pytest.mark.parametrize("text, message", [
    ("learnin_rate: {low: 1.0e-5, high: 1.0e-4}\n", r"'learnin_rate' is not a training setting"),
    ("learning_rate: {low: 1.0e-3, high: 1.0e-4}\n", r"learning_rate has low 0.001 >= high 0.0001"),
    ("beta: {low: 0, high: 1, log: true}\n", r"beta is a log range from 0; a log range needs low > 0"),
    ("loss_type: [sigmoid, nosuch]\n", r"loss_type=nosuch: .*not one of"),
    ("recipe:\n  - {loss_type: sigmoid+sft, loss_weights: 1+1+1}\n", r"recipe=.*loss-weights"),
    ("learning_rate: {low: 1e-5, high: 1.0e-4}\n", r"learning_rate.low is '1e-5'.*write 1.0e-5"),
    ("lora_r: {low: 4.5, high: 16}\n", r"lora_r is a whole-number setting"),
    ("- 1\n", r"a search space is a YAML mapping"),
], ids=["unknown setting", "low above high", "log from 0", "a loss TRL refuses", "weights of the wrong length",
        "YAML exponent read as text", "a fraction for an int", "not a mapping"])
def test_a_bad_space_is_refused_before_any_training(text, message, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_space(path).check(TrainConfig())


def test_the_space_reads_ranges_choices_and_recipes(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: {low: 1.0e-5, high: 5.0e-4, log: true}\nlora_r: {low: 8, high: 32, step: 8}\n"
                    "loss_type: [sigmoid, sigmoid+sft]\nrecipe:\n  - {beta: 0.1}\n  - {beta: 0.5, loss_weights: null}\n")
    space = load_space(path)
    space.check(TrainConfig())
    params = {p.name: p for p in space.params}
    assert params["lora_r"].integer and params["learning_rate"].log
    assert params["loss_type"].settings("sigmoid+sft") == {"loss_type": "sigmoid,sft"}
    assert params["recipe"].settings("beta=0.5;loss_weights=None") == {"beta": 0.5, "loss_weights": None}
    assert space.grid(3)["lora_r"] == [8, 20, 32] and space.grid(3)["learning_rate"][1] == pytest.approx(7.07e-5, rel=0.01)


# --------------------------------------------------------------------------- a real (tiny) study


def test_a_two_trial_study_trains_two_differently_configured_adapters_and_reports(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    result = runner.invoke(app, search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--trials", "2", "--prune-every", "0"))
    assert result.exit_code == 0, result.output[-3000:]
    study = load(tmp_path)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0].params != trials[1].params
    # each trial trained with its own settings: the run's config.yaml holds them, and the adapters differ
    for t in trials:
        saved = (Path(t.user_attrs["run_dir"]) / "config.yaml").read_text()
        assert f"learning_rate: {t.params['learning_rate']}" in saved and f"loss_type: {t.params['loss_type']}" in saved
    adapters = [(Path(t.user_attrs["run_dir"]) / "adapter_model.safetensors").read_bytes() for t in trials]
    assert adapters[0] != adapters[1]
    # the value is the specific change, inside its own interval, with the verdict and answers recorded
    for t in trials:
        low, high = t.user_attrs["specific_interval"]
        assert low <= t.value <= high and t.user_attrs["verdict"] and t.user_attrs["q2"] in (True, False)
        # Q2 and Q3 reach the sampler as the trial's own constraints (<= 0 is met), as the answers say
        assert set(t.constraints) == {"heldout_preference", "chosen_likelihood"}
        assert (t.constraints["heldout_preference"] <= 0) == t.user_attrs["q2"] and (t.constraints["chosen_likelihood"] <= 0) == t.user_attrs["q3"]
    out = tmp_path / "out"
    text = (out / "results.md").read_text()
    assert "| 0 | complete |" in text and "| 1 | complete |" in text and (out / "history.png").stat().st_size > 1000
    best = json.loads((out / "results.json").read_text())["pick"]
    assert [r["recipe"] for r in json.loads((out / "results.json").read_text())["trials"]] == ["DPO" if t.params["loss_type"] == "sigmoid" else "IPO" for t in trials]
    assert best in (0, 1) and f"learning_rate: {trials[best].params['learning_rate']}" in (out / "best-config.yaml").read_text()
    # the report from the database alone, on "another machine" (no training options given): the study's own shared
    # settings, not this command's defaults, and both trials in the rule's order in confirm/ (the pick first)
    elsewhere = runner.invoke(app, ["search", "--report", "--storage", f"sqlite:///{out / 'study.db'}", "-o", str(tmp_path / "elsewhere")])
    assert elsewhere.exit_code == 0, elsewhere.output
    assert f"(pick: trial {best}; " in elsewhere.output and "**" not in elsewhere.output
    copied = (tmp_path / "elsewhere" / "best-config.yaml").read_text()
    assert f"- {pairs_file}" in copied and "max_steps: 4" in copied and f"model: {tiny_gpt2}" in copied
    confirm = sorted(p.name for p in (tmp_path / "elsewhere" / "confirm").iterdir())
    assert confirm == sorted([f"1-trial-{best}.yaml", f"2-trial-{1 - best}.yaml"])
    second = (tmp_path / "elsewhere" / "confirm" / f"2-trial-{1 - best}.yaml").read_text()
    assert f"learning_rate: {trials[1 - best].params['learning_rate']}" in second and f"loss_type: {trials[1 - best].params['loss_type']}" in second
    # the same command again: the study goes on (two more trials), the baseline is not scored again
    again = runner.invoke(app, search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--trials", "1", "--prune-every", "0"))
    assert again.exit_code == 0 and "already scored, kept" in again.output and len(load(tmp_path).trials) == 3
    # another space under the same study name is refused, naming what differs
    (tmp_path / "space.yaml").write_text(SPACE.replace("ipo", "hinge"))
    other = runner.invoke(app, search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--trials", "1"))
    assert other.exit_code == 2 and "exists in this database with another space" in other.output and len(load(tmp_path).trials) == 3


@pytest.mark.filterwarnings("error::FutureWarning")  # the sampler takes no deprecated argument (constraints_func goes in Optuna 7)
def test_the_median_pruner_stops_a_trial_behind_the_others():
    """The pruner's wiring with a stub objective: four trials at -1 at step 10, then one at +1 is pruned and one at -2 is not."""
    import optuna

    from dpo_align.search.study import open_study

    space_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"space-{os.getpid()}.yaml"
    space_file.write_text(SPACE)
    study = open_study(optuna.storages.InMemoryStorage(), "stub", load_space(space_file), TrainConfig(), {}, sampler="tpe", grid_points=3,
                       resume=False)

    def objective(value):
        def run(trial):
            trial.report(value, 10)
            if trial.should_prune():
                raise optuna.TrialPruned()
            return value
        return run

    for _ in range(4):
        study.optimize(objective(-1.0), n_trials=1)
    study.optimize(objective(1.0), n_trials=1)
    study.optimize(objective(-2.0), n_trials=1)
    assert [t.state.name for t in study.trials[4:]] == ["PRUNED", "COMPLETE"]


def test_a_pruned_trial_loses_its_folder_and_keeps_its_values(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """A real tiny trial whose checkpoint (step 2 of 4) scores behind four earlier trials is pruned there: its run folder is
    removed, its intermediate value stays in the study."""
    import optuna

    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "out").mkdir()
    url = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    study = optuna.create_study(study_name="dpo-align", storage=url)
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "loss_type": optuna.distributions.CategoricalDistribution(["sigmoid", "ipo"])}
    for _ in range(4):  # earlier trials far ahead at step 2: any real trial is behind their median
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": 1e-3, "loss_type": "sigmoid"}, distributions=distributions,
                                                  value=-10.0, intermediate_values={2: -10.0}))
    result = runner.invoke(app, search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--trials", "1", "--prune-every", "0.5"))
    assert result.exit_code == 0, result.output[-3000:]
    trial = load(tmp_path).trials[-1]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [2]
    assert trial.constraints == {"heldout_preference": 1.0, "chosen_likelihood": 1.0}  # never scored: TPE counts it infeasible
    assert not Path(trial.user_attrs["run_dir"]).exists()
    assert "| 4 | pruned |" in (tmp_path / "out" / "results.md").read_text()


def test_requeue_puts_back_only_the_settings_whose_workers_died_and_they_continue_in_the_first_folder(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """After Optuna's retries are spent (three SIGKILLed attempts of one setting), `--requeue` queues that setting once
    more, marked as a retry of its first attempt, so the next worker trains it in that attempt's folder; a diverged trial,
    a crashed one and settings another trial finished are left alone."""
    import optuna

    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "out").mkdir()
    study = optuna.create_study(study_name="dpo-align", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "loss_type": optuna.distributions.CategoricalDistribution(["sigmoid", "ipo"])}

    def add(lr, loss, state="FAIL", system=None, user=None, curve=None):
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": lr, "loss_type": loss}, distributions=distributions,
                                                  state=optuna.trial.TrialState[state], value=0.0 if state == "COMPLETE" else None,
                                                  system_attrs=system or {}, user_attrs=user or {}, intermediate_values=curve))

    add(1e-3, "sigmoid")  # 0, 1, 2: one setting, killed three times (the automatic retries spent)
    add(1e-3, "sigmoid", system={"failed_trial": 0, "retry_history": [0]})
    add(1e-3, "sigmoid", system={"failed_trial": 0, "retry_history": [0, 1]}, curve={2: -0.5})
    add(2e-3, "ipo", user={"failed": "training diverged at step 3"})  # 3: a result
    add(5e-3, "sigmoid", user={"error": "ValueError: a bug"})  # 4: would crash again
    add(3e-3, "ipo")  # 5: killed, but 6 finished the same settings
    add(3e-3, "ipo", state="COMPLETE")
    result = runner.invoke(app, ["search", "--requeue", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "trial 0's settings (attempts 0, 1, 2" in result.output and "1 trial(s) queued again" in result.output
    waiting = [t for t in load(tmp_path).trials if t.state.name == "WAITING"]
    assert len(waiting) == 1 and waiting[0].params == {"learning_rate": 1e-3, "loss_type": "sigmoid"}
    assert waiting[0].system_attrs["failed_trial"] == 0 and waiting[0].user_attrs["requeued_after"] == [0, 1, 2]
    assert waiting[0].intermediate_values == {2: -0.5}  # the learning curve the attempts reported, for the pruner
    status = runner.invoke(app, ["search", "--status", "-o", str(tmp_path / "out")])
    assert "| 7 | waiting | DPO | learning_rate=0.001, loss_type=sigmoid |" in status.output  # what it is queued with
    # each ended attempt says where its settings went: Optuna's retries (0 → 1 → 2), then the requeue (2 → 7), in a
    # table of their own below the one row per setting that the trials table keeps
    settings, ended = status.output.split("### Attempts that ended with their worker")
    assert all(f"| {a} | fail → {b} |" in ended and f"| {a} |" not in settings for a, b in ((0, 1), (1, 2), (2, 7)))
    # 5 was not retried, but 6 ran its very settings: one row per setting, 5's below it; a divergence (3) is a result
    assert "| 5 | fail → 6 (afresh) |" in ended and "| 5 |" not in settings and "| 3 | fail | IPO |" in settings
    again = runner.invoke(app, ["search", "--requeue", "-o", str(tmp_path / "out")])
    assert "0 trial(s) queued again" in again.output and len(load(tmp_path).trials) == 8  # queued once, not twice

    worker = runner.invoke(app, search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--trials", "1", "--prune-every", "0"))
    assert worker.exit_code == 0, worker.output[-3000:]
    trial = load(tmp_path).trials[7]
    assert trial.state.name == "COMPLETE" and trial.params == {"learning_rate": 1e-3, "loss_type": "sigmoid"}
    run_dir = Path(trial.user_attrs["run_dir"])
    assert run_dir.name == "trial-0" and "learning_rate: 0.001" in (run_dir / "config.yaml").read_text()


def test_requeue_first_fails_a_silent_workers_trial_so_optuna_retries_it(tmp_path, monkeypatch):
    """At the start of a session, before any worker runs: `--requeue` fails the trials whose workers went silent (as a
    starting worker would), Optuna's callback queues their retry, and nothing is queued twice."""
    import optuna

    from dpo_align.search.study import open_storage

    monkeypatch.setenv("DPO_ALIGN_SEARCH_HEARTBEAT", "1")
    monkeypatch.setenv("DPO_ALIGN_SEARCH_GRACE", "2")
    (tmp_path / "out").mkdir()
    storage = open_storage(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    study = optuna.create_study(study_name="dpo-align", storage=storage)
    running = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    running.report(0.25, 3)  # a checkpoint's value: the pruner needs the retry to keep it
    storage.record_heartbeat(running._trial_id)  # then its worker dies: no more heartbeats
    time.sleep(3)
    result = runner.invoke(app, ["search", "--requeue", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and "0 trial(s) queued again" in result.output, result.output
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"] and trials[1].system_attrs["failed_trial"] == 0
    assert trials[1].params == trials[0].params and trials[1].intermediate_values == {3: 0.25}
    # --status and --report read without heartbeats: they never fail or retry a running worker's trial
    url = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    assert open_storage(url).get_heartbeat_interval() == 1 and open_storage(url, heartbeat=False).get_heartbeat_interval() is None


# --------------------------------------------------------------------------- many workers, one PostgreSQL database

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def postgres():
    """A real PostgreSQL server in a temporary folder, run as the postgres user (it refuses root); its URL."""
    if not (PG_BIN / "initdb").is_file() or shutil.which("runuser") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL 15 is not installed, and CI must run the two-worker test")
        pytest.skip("PostgreSQL 15 is not installed")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dpo-align-pg-"))  # not under pytest's root-only folders: postgres must reach it
    shutil.chown(folder, "postgres")
    port = 54000 + os.getpid() % 1000

    def as_postgres(*args):
        done = subprocess.run(["runuser", "-u", "postgres", "--", *map(str, args)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"

    as_postgres(PG_BIN / "initdb", "-D", folder / "data", "-A", "trust", "-U", "postgres")
    as_postgres(PG_BIN / "pg_ctl", "-D", folder / "data", "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "-l",
                folder / "server.log", "-w", "start")
    try:
        as_postgres(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "study")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/study"
    finally:
        as_postgres(PG_BIN / "pg_ctl", "-D", folder / "data", "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _worker(args, tmp_path, name, env=None):
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (the process holds it)
    return subprocess.Popen([sys.executable, "-m", "dpo_align", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_two_workers_share_one_postgres_study_and_a_killed_workers_trial_is_retried(postgres, tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """Two worker processes, one PostgreSQL study: every trial runs once. Then a worker is SIGKILLed mid-trial; the other
    fails its trial on the missed heartbeats, retries the same settings, and the study ends with every trial's result."""
    import optuna

    (tmp_path / "space.yaml").write_text(SPACE)
    common = search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--storage", postgres, "--prune-every", "0", "--study", "shared")
    workers = [_worker([*common, "--trials", "2"], tmp_path, f"worker-{i}") for i in (1, 2)]
    for w in workers:
        assert w.wait(timeout=900) == 0, (tmp_path / "worker-1.log").read_text()[-2000:] + (tmp_path / "worker-2.log").read_text()[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    folders = [t.user_attrs["run_dir"] for t in study.trials]
    assert len(set(folders)) == 4 and all((Path(f) / "manifest.json").is_file() for f in folders)  # each trained once, in its own folder
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4  # the workers drew different settings
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2

    # the fault: a worker killed while its trial trains (a long one: 400 steps); the other fails and retries it
    fast = {"DPO_ALIGN_SEARCH_HEARTBEAT": "1", "DPO_ALIGN_SEARCH_GRACE": "4"}
    slow = search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--storage", postgres, "--prune-every", "0", "--study", "fault", steps=400)
    victim = _worker([*slow, "--trials", "1"], tmp_path, "victim", fast)
    deadline = time.time() + 300
    while not re.search(r"(sigmoid|ipo):", (tmp_path / "victim.log").read_text()) and time.time() < deadline:  # its training bar
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = _worker([*slow, "--trials", "2", "--max-trials", "2"], tmp_path, "survivor", fast)
    assert survivor.wait(timeout=900) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="fault", storage=postgres).trials
    assert trials[0].state.name == "FAIL"  # the killed worker's trial, failed on its missed heartbeats
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == trials[0].params
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2
    assert retried[0].user_attrs["run_dir"].endswith("trial-0")  # continued in the first attempt's folder


def test_an_unreachable_database_is_named_within_seconds(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    started = time.time()
    result = runner.invoke(app, search_args(tiny_gpt2, pairs_file, tiny_data, tmp_path, "--storage",
                                            "postgresql+psycopg://someone:secret@127.0.0.1:9/study"))
    assert result.exit_code == 2 and "--storage postgresql+psycopg://someone:***@127.0.0.1:9/study: cannot open" in result.output
    assert "secret" not in result.output and time.time() - started < 60


def test_a_checkpoint_saved_by_a_stop_is_not_scored_as_a_learning_curve_point(monkeypatch, tmp_path):
    """Ctrl-C or SIGTERM saves a checkpoint after the current step to resume from; scoring it would hold the stopping
    worker for the subset's whole scoring and report a value at a step no other trial reports. A scheduled checkpoint
    is scored, stop or not."""
    from transformers import TrainerControl, TrainerState

    from dpo_align.search import trial as trial_module

    scored = []
    monkeypatch.setattr(trial_module, "score_spec", lambda spec, options: scored.append(spec.label) or {})
    monkeypatch.setattr(trial_module, "controlled_change", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("scored")))

    class Trial:
        number = 7

    callback = trial_module.PruneOnCheckpoints(Trial(), type("Subset", (), {"baseline": {"pretrained": "m"}, "options": None})(),
                                               tmp_path, 42, print)
    args = type("Args", (), {"output_dir": str(tmp_path)})()
    state = TrainerState(global_step=13, max_steps=40, save_steps=10)
    stop = TrainerControl(should_training_stop=True, should_save=True)
    callback.on_save(args, state, stop)
    assert scored == []
    state.global_step = 20
    with pytest.raises(RuntimeError, match="scored"):
        callback.on_save(args, state, stop)
    assert scored == ["trial 7 step 20"]


def test_the_slice_plot_names_recipes_places_pruned_trials_and_leaves_sft_off_the_beta_axis():
    """slice.png: a recipe choice reads as its objective's name (not 'loss_type=sigmoid;sft_first_pairs=1000'), a
    pruned trial is drawn hollow at its last checkpoint's value, a finished one filled with a black ring where it meets
    Q2 and Q3, SFT has no point on the beta axis (it has no beta), and each range is drawn whole on its log axis."""
    from matplotlib.collections import PathCollection
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from dpo_align.grid import trial_recipe
    from dpo_align.search import slice_plot

    def row(trial, state, settings, value=None, interval=None, intermediate=None, q2=None, q3=None):
        return {"trial": trial, "state": state, "settings": settings, "recipe": trial_recipe(settings, TrainConfig()),
                "specific_change": value, "specific_interval": interval,
                "intermediate": intermediate or {}, "q2": q2, "q3": q3}

    table = [row(0, "complete", {"learning_rate": 1e-4, "beta": 0.1, "loss_type": "sigmoid", "sft_first_pairs": 1000}, -0.02, [-0.03, -0.01], q2=True, q3=True),
             row(1, "complete", {"learning_rate": 3e-4, "beta": 0.5, "loss_type": "sft"}, 0.01, [0.0, 0.02], q2=False, q3=True),
             row(2, "pruned", {"learning_rate": 2e-5, "beta": 0.05, "loss_type": "sigmoid"}, intermediate={"63": 0.004}),
             row(3, "fail", {"learning_rate": 5e-5, "beta": 0.2, "loss_type": "ipo"})]
    searched = {"learning_rate": FloatDistribution(1e-5, 5e-4, log=True), "beta": FloatDistribution(0.01, 1.0, log=True),
                "recipe": CategoricalDistribution(["loss_type=sigmoid", "loss_type=sft", "loss_type=sigmoid;sft_first_pairs=1000"])}
    fig = slice_plot.figure(table, searched)
    lr, beta, recipe = fig.axes[:3]

    def dots(ax):  # (x, y, hollow, ringed) per trial drawn
        out = []
        for c in ax.collections:
            if isinstance(c, PathCollection):
                (x, y), edge = c.get_offsets()[0], c.get_edgecolor()[0]
                out.append((float(x), float(y), len(c.get_facecolor()) == 0, tuple(edge[:3]) == (0.0, 0.0, 0.0)))
        return sorted(out)

    assert [t.get_text() for t in recipe.get_xticklabels()] == ["DPO", "SFT", "SFT → DPO"]
    assert dots(lr) == sorted([(1e-4, -0.02, False, True), (3e-4, 0.01, False, False), (2e-5, 0.004, True, False)])
    assert [(x, y) for x, y, *_ in dots(beta)] == sorted([(0.05, 0.004), (0.1, -0.02)])  # SFT's 0.5 is not drawn
    assert lr.get_xscale() == "log" and lr.get_xlim()[0] < 1e-5 and lr.get_xlim()[1] > 5e-4
    assert slice_plot.figure([table[3]], searched) is None  # nothing to place yet
