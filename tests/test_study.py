"""The Optuna study with MLflow tracking: resume, concurrent workers, failures, best-run export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState

from shortcut_study import train as train_module
from shortcut_study.cli import main
from shortcut_study.config import Config
from shortcut_study.errors import UserError
from shortcut_study.storage import open_storage
from shortcut_study.study import SweepOptions, best, sweep, trial_run_config
from shortcut_study.tracking import init_tracking

from .conftest import kill_once_training

TINY = ("train.batch_size=32", "train.eval_batch_size=64", "train.tta=flip")


def _opts(dataset, tmp_path, **kw) -> SweepOptions:
    base = dict(data=dataset, study="t", n_trials=2, timeout=None, storage=f"sqlite:///{tmp_path}/optuna.db",
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", epochs=1, subset=0, sets=TINY)
    return SweepOptions(**{**base, **kw})


def _runs(tmp_path, study="t"):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[study], output_format="list")
    return [r for r in runs if r.data.tags.get("role") != "study"]  # the trials' runs, not the study's parent


def test_sweep_tracks_every_trial_resumes_and_exports_best(dataset, tmp_path, capsys):
    opts = _opts(dataset, tmp_path)
    sweep(opts)
    study = optuna.load_study(study_name="t", storage=opts.storage)
    assert len(study.trials) == 2 and study.trials[0].user_attrs.get("default")
    runs = _runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    run = runs[0]
    assert "val_acc" in run.data.metrics and "val_conflicting_acc" in run.data.metrics
    assert "train.lr" in run.data.params and run.data.tags["study"] == "t" and "git_commit" in run.data.tags
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"val_confusion.png", "val_confusion.csv", "q1_model.pt"} <= artifacts

    sweep(_opts(dataset, tmp_path, n_trials=3))  # the same command with a larger budget resumes
    assert len(optuna.load_study(study_name="t", storage=opts.storage).trials) == 3

    out = tmp_path / "results"
    text = best(dataset, "t", opts.storage, opts.tracking_uri, out)
    assert "best run" in text and (out / "q1_model.pt").is_file()
    assert len((out / "q1_test.txt").read_text().splitlines()) == 30
    first = (out / "q1_test.txt").read_bytes()
    # the exported config is the run's, so `predict` on the export reproduces q1_test.txt
    exported = json.loads((out / "config.json").read_text())
    winner = mlflow.get_run(json.loads((out / "best_run.json").read_text())["run_id"])
    assert Config.from_dict(exported).flat() == trial_run_config(winner.data.params).flat()
    assert main(["predict", "--checkpoint", str(out / "q1_model.pt"), "--images", str(dataset / "test_unlabeled"),
                 "--out", str(tmp_path / "again.txt")]) == 0
    assert (tmp_path / "again.txt").read_bytes() == first
    best(dataset, "t", opts.storage, opts.tracking_uri, out)  # idempotent
    assert (out / "q1_test.txt").read_bytes() == first


def test_failing_trial_is_marked_failed_and_sweep_goes_on(dataset, tmp_path, monkeypatch):
    real_fit, calls = train_module.fit, []

    def flaky_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise train_module.TrainingDiverged("training diverged at epoch 1 (loss nan)")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit", flaky_fit)
    opts = _opts(dataset, tmp_path)
    sweep(opts)
    states = [t.state for t in optuna.load_study(study_name="t", storage=opts.storage).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]  # a failed trial does not count
    statuses = sorted(r.info.status for r in _runs(tmp_path))
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shortcut_study.cli", *args]


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_three_workers_run_exactly_n_distinct_trials(dataset, tmp_path, backend):
    storage = f"sqlite:///{tmp_path}/optuna.db" if backend == "sqlite" else str(tmp_path / "optuna.journal")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    init_tracking(tracking, "t")  # create the MLflow database once, before the workers start
    cmd = _cli("sweep", "--data", str(dataset), "--study", "t", "--n-trials", "5", "--epochs", "1", "--subset", "0",
               "--storage", storage, "--tracking-uri", tracking, *sum((["--set", s] for s in TINY), []))
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    trials = optuna.load_study(study_name="t", storage=open_storage(storage)).trials
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)  # exactly N, none over
    configs = {json.dumps(t.params, sort_keys=True) for t in trials}
    assert len(configs) == 5  # distinct sampler streams: no worker repeats another's draw
    assert len({t.user_attrs.get("default", False) for t in trials if t.user_attrs.get("default")}) == 1
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(trials)  # no trial run twice
    assert {r.info.run_id for r in _runs(tmp_path)} == set(run_ids)  # none lost


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_killed_sweep_resumes_and_marks_the_trial_failed(dataset, tmp_path, backend):
    storage = f"sqlite:///{tmp_path}/optuna.db" if backend == "sqlite" else str(tmp_path / "optuna.journal")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--data", str(dataset), "--study", "t", "--subset", "0", "--storage", storage,
              "--tracking-uri", tracking, "--heartbeat", "1", "--grace", "3", *sum((["--set", s] for s in TINY), [])]
    kill_once_training(_cli("sweep", "--n-trials", "1", "--epochs", "400", *common), storage, Path.cwd())
    assert main(["sweep", "--n-trials", "2", "--epochs", "1", *common]) == 0  # waits out the grace period
    trials = optuna.load_study(study_name="t", storage=open_storage(storage)).trials
    assert trials[0].state == TrialState.FAIL and trials[-1].state == TrialState.COMPLETE
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    # the killed trial's configuration ran again (once the grace period had passed)
    assert any(t.params == trials[0].params and t.state == TrialState.COMPLETE for t in trials[1:])
    killed = mlflow.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED"


def test_trial_killed_at_start_or_before_its_run_id_is_stored_ends_failed(dataset, tmp_path):
    """A worker killed right after creating its trial (no heartbeat yet), and one killed after
    opening its MLflow run but before storing the run id on the trial: both FAIL / FAILED."""
    opts = _opts(dataset, tmp_path, n_trials=2, heartbeat=1, grace=2)
    sweep(_opts(dataset, tmp_path, n_trials=1))  # creates the study and the MLflow experiment
    study = optuna.load_study(study_name="t", storage=opts.storage)
    orphan = study.ask()  # RUNNING, never a heartbeat, as if killed at once
    experiment = init_tracking(opts.tracking_uri, "t")
    client = mlflow.MlflowClient()
    run = client.create_run(experiment, tags={"study": "t", "trial": str(orphan.number)})
    sweep(opts)
    trials = optuna.load_study(study_name="t", storage=opts.storage).trials
    assert trials[orphan.number].state == TrialState.FAIL
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2


def test_a_trial_failed_in_the_last_pass_has_its_run_failed_too(tmp_path):
    """The worker's last pass fails a silent trial and then finds nothing to claim (its cell was
    finished before the kill): its MLflow run is still ended FAILED before the worker leaves."""
    from shortcut_study.storage import ClaimLock
    from shortcut_study.trials import WorkerSettings, run_shared_trials

    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    silent = study.ask()  # RUNNING, no heartbeat: a killed worker's
    experiment = init_tracking(f"sqlite:///{tmp_path}/m.db", "s")
    client = mlflow.MlflowClient()
    run = client.create_run(experiment, tags={"study": "s", "trial": str(silent.number)})
    time.sleep(0.2)
    settings = WorkerSettings(experiment_id=experiment, heartbeat=1, grace=0.1, deadline=math.inf, storage=url,
                              retry=False)  # as the comparison: its cells are enqueued again by next_cell
    run_shared_trials(study, ClaimLock(url, "s"), lambda st: None, lambda trial: 0.0, settings,
                      after_trial=lambda frozen: None)
    assert study.trials[silent.number].state == TrialState.FAIL
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_a_namesake_study_on_another_storage_gets_its_own_parent_run(tmp_path):
    """A part on a storage of its own (same study name, same MLflow experiment) makes its own parent
    run instead of adopting the other storage's (whose settings it may not share)."""
    from shortcut_study.trials import ensure_parent_run, shared_study

    experiment = init_tracking(f"sqlite:///{tmp_path}/m.db", "s")
    parents = []
    for db, value in (("a.db", 1.0), ("b.db", 2.0)):
        study, _ = shared_study(open_storage(f"sqlite:///{tmp_path}/{db}"), "s", "grid", {"x": 1})
        parents.append(ensure_parent_run(study, experiment, "s", {}, {"train.warmup_epochs": value}))
    assert parents[0] != parents[1]
    client = mlflow.MlflowClient()
    assert [client.get_run(r).data.params["train.warmup_epochs"] for r in parents] == ["1.0", "2.0"]
    assert all(client.get_run(r).info.status == "FINISHED" for r in parents)


def test_a_study_of_failed_trials_completes_after_the_fix(dataset, tmp_path, capsys):
    args = ["sweep", "--data", str(dataset), "--study", "t", "--n-trials", "2", "--epochs", "1", "--subset", "0",
            "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            *sum((["--set", s] for s in TINY), [])]
    failing = [*args, "--set", "train.device=cuda:7"]  # no such device here: every trial fails
    if not torch.cuda.is_available():
        assert main(failing) == 2
        err = capsys.readouterr().err
        assert "trials failed in a row" in err and "cuda" in err and len(err.strip().splitlines()) == 1
    assert main(args) == 0
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2


@pytest.mark.parametrize("flag, value, message", [
    ("--subset", "-5", "--subset must be >= 0"), ("--epochs", "0", "train.epochs"),
    ("--timeout", "-1", "--timeout must be >= 0"), ("--heartbeat", "0", "--heartbeat must be >= 1"),
    ("--set", "train.device=cudaXYZ", "train.device"), ("--objective", "best", "unknown objective"),
])
def test_bad_sweep_options_exit_2_before_any_trial(dataset, tmp_path, capsys, flag, value, message):
    db = tmp_path / "optuna.db"
    assert main(["sweep", "--data", str(dataset), "--study", "t", "--storage", f"sqlite:///{db}",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not db.exists()


def test_bad_storage_and_missing_study(dataset, tmp_path, capsys):
    with pytest.raises(UserError, match="unknown storage URL"):
        open_storage("redis://localhost/0")
    with pytest.raises(UserError, match="cannot reach storage|driver missing"):
        open_storage("postgresql://nobody@127.0.0.1:1/none")
    assert main(["best", "--data", str(dataset), "--study", "nothing", "--storage", f"sqlite:///{tmp_path}/o.db",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--out", str(tmp_path / "r")]) == 2
    assert "run `make sweep` first" in capsys.readouterr().err


def test_study_objective_mismatch(dataset, tmp_path):
    sweep(_opts(dataset, tmp_path, n_trials=1))
    with pytest.raises(UserError, match="created with objective"):
        sweep(_opts(dataset, tmp_path, n_trials=1, objective="worst_group"))


def test_mlflow_conventions_for_tuning(dataset, tmp_path):
    """One parent run per study with its settings and best trial; each trial a nested child run
    named by its number, with `trial_number` as a parameter and a per-group accuracy table."""
    opts = _opts(dataset, tmp_path, n_trials=3)
    sweep(opts)
    mlflow.set_tracking_uri(opts.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["n_trials"] == "3" and "best_value" in parent.data.metrics
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_trial.json", "optimization_history.png", "param_importances.png"} <= names
    children = [r for r in runs if r.data.tags.get("role") != "study"]
    assert len(children) == 3
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"trial-{child.data.params['trial_number']}"
        assert "val_groups.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "total_train_seconds" in child.data.metrics and "median_images_per_s" in child.data.metrics


def test_workers_flag_runs_pinned_processes_on_one_study(dataset, tmp_path):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    init_tracking(tracking, "t")
    assert main(["sweep", "--data", str(dataset), "--study", "t", "--n-trials", "3", "--epochs", "1", "--subset",
                 "0", "--storage", storage, "--tracking-uri", tracking, "--workers", "2",
                 *sum((["--set", s] for s in TINY), [])]) == 0
    trials = optuna.load_study(study_name="t", storage=storage).trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)


def test_unreachable_tracking_server_is_one_line_naming_it(dataset, tmp_path, capsys):
    url = "http://127.0.0.1:9"  # the discard port: nothing listens
    assert main(["sweep", "--data", str(dataset), "--study", "t", "--storage", f"sqlite:///{tmp_path}/o.db",
                 "--tracking-uri", url, "--n-trials", "1", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and url in err and len(err.splitlines()) == 1, err


def test_workers_get_a_gpu_each_when_there_are_several():
    from shortcut_study.trials import gpu_shares

    assert gpu_shares(3, None, count=0) == [None, None, None]  # CPU: nothing to hand out
    assert gpu_shares(2, None, count=1) == [None, None]  # one GPU: shared, as it is
    assert gpu_shares(3, None, count=2) == ["0", "1", "0"]
    assert gpu_shares(2, "3,5") == ["3", "5"]  # the parent's own selection is split


def test_a_resumed_run_restores_the_cuda_random_state_when_there_is_one(monkeypatch, dataset, tmp_path):
    """last.pt carries `cuda_rng` (None on a CPU-only machine); with CUDA, _restore sets it back."""
    from shortcut_study.config import make_config
    from shortcut_study.run import Run
    from shortcut_study.train import fit

    sets = ["train.batch_size=32", "train.eval_batch_size=64", "train.epochs=1", "augment.digit_shuffle_p=0"]
    fit(make_config(sets=sets), dataset, tmp_path / "r", quiet=True)
    state = Run(tmp_path / "r").load_last()
    assert "cuda_rng" in state and state["cuda_rng"] is None


# ---- the distributed sweep's faults (issue 25, F1-F5): a kill or a cut at the exact code point ----------

def _fault_common(dataset, tmp_path, storage: str) -> list[str]:
    return ["--data", str(dataset), "--study", "t", "--epochs", "1", "--subset", "0", "--storage", storage,
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--heartbeat", "1", "--grace", "2",
            *sum((["--set", s] for s in TINY), [])]


def _killed_at(point: str, argv: list[str]) -> None:
    import os

    done = subprocess.run(_cli(*argv), cwd=Path.cwd(), env={**os.environ, "SHORTCUT_STUDY_FAULT": point},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]  # died at the point, as a killed machine would


def _parents(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return [r for r in mlflow.search_runs(experiment_names=["t"], output_format="list") if r.data.tags.get("role") == "study"]


def _storage_url(backend: str, tmp_path, request) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/optuna.db"
    return request.getfixturevalue("pg_db")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_killed_while_creating_the_parent_run_leaves_one_parent(dataset, tmp_path, backend, request):
    """F3: the creator killed after making the parent run, before recording it on the study."""
    storage = _storage_url(backend, tmp_path, request)
    common = _fault_common(dataset, tmp_path, storage)
    _killed_at("parent_run_created", ["sweep", "--n-trials", "1", *common])
    assert main(["sweep", "--n-trials", "1", *common]) == 0
    parents = _parents(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    child = _runs(tmp_path)[0]
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_killed_after_its_run_finished_but_before_optuna_knew(dataset, tmp_path, backend, request):
    """F2: the trial is failed and retried, and its FINISHED run is marked FAILED with it — a failed
    trial never shows a finished run, and the retry is the one COMPLETE trial of those parameters."""
    storage = _storage_url(backend, tmp_path, request)
    common = _fault_common(dataset, tmp_path, storage)
    _killed_at("run_finished_untold", ["sweep", "--n-trials", "1", *common])
    assert main(["sweep", "--n-trials", "1", *common]) == 0  # waits out the grace, fails it, retries it
    trials = optuna.load_study(study_name="t", storage=open_storage(storage)).trials
    assert trials[0].state == TrialState.FAIL
    assert [t.params == trials[0].params and t.state == TrialState.COMPLETE for t in trials[1:]].count(True) == 1
    status = {r.data.tags["trial"]: r.info.status for r in _runs(tmp_path)}
    assert status[str(trials[0].number)] == "FAILED"
    assert all(status[str(t.number)] == "FINISHED" for t in trials if t.state == TrialState.COMPLETE)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_killed_while_failing_a_silent_trial_loses_no_parameters(dataset, tmp_path, backend, request):
    """F4: a worker killed after failing another's silent trial, before enqueueing its retry: the
    next worker enqueues it (once)."""
    import time

    storage = _storage_url(backend, tmp_path, request)
    common = _fault_common(dataset, tmp_path, storage)
    assert main(["sweep", "--n-trials", "1", *common]) == 0  # the study, its default trial
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    orphan = study.ask({"train.lr": optuna.distributions.FloatDistribution(0.02, 0.4, log=True)})
    time.sleep(3)  # silent past the grace period
    _killed_at("silent_trial_failed", ["sweep", "--n-trials", "2", *common])
    assert study.trials[orphan.number].state == TrialState.FAIL  # failed, and then the worker died
    assert main(["sweep", "--n-trials", "2", *common]) == 0
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retries) == 1 and retries[0].params["train.lr"] == orphan.params["train.lr"]
    assert retries[0].state == TrialState.COMPLETE


def test_a_database_outage_at_an_epoch_report_does_not_fail_the_trial(dataset, tmp_path, monkeypatch, capsys):
    """F1: the end-of-epoch report raises Optuna's StorageInternalError (the database is away); the
    trial trains on and its result is told when the database is back."""
    calls = {"n": 0}
    real = optuna.Trial.report

    def away_once(self, value, step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise optuna.exceptions.StorageInternalError("could not connect to server: Connection refused")
        return real(self, value, step)

    monkeypatch.setattr(optuna.Trial, "report", away_once)
    assert sweep(_opts(dataset, tmp_path, n_trials=1, sets=(*TINY, "train.eval_every=1"))) is not None
    assert calls["n"] >= 1 and "not reported, training on" in capsys.readouterr().out
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE]


def test_an_error_after_training_is_recorded_on_run_and_trial(dataset, tmp_path, monkeypatch):
    """F5: artifact logging fails (a read-only store) after training: the MLflow run ends FAILED with
    its state and error tags, and the trial records the error."""
    def read_only(*args, **kwargs):
        raise PermissionError("[Errno 30] Read-only file system: 'mlruns/artifacts'")

    monkeypatch.setattr(mlflow, "log_artifact", read_only)
    with pytest.raises(UserError, match="Read-only"):
        sweep(_opts(dataset, tmp_path, n_trials=3))
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert trials and all(t.state == TrialState.FAIL and "Read-only" in t.user_attrs["error"] for t in trials)
    runs = _runs(tmp_path)
    assert runs and all(r.info.status == "FAILED" and r.data.tags["state"] == "FAILED" and "Read-only" in r.data.tags["error"]
                        for r in runs)
