"""The Optuna study with MLflow tracking: resume, concurrent workers, failures, best-run export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from shortcut_study import train as train_module
from shortcut_study.cli import main
from shortcut_study.config import Config
from shortcut_study.errors import UserError
from shortcut_study.study import SweepOptions, best, open_storage, sweep
from shortcut_study.tracking import init_tracking

REPO = Path(__file__).resolve().parents[1]
TINY = ("train.batch_size=32", "train.eval_batch_size=64", "train.tta=flip")


def _opts(dataset, tmp_path, **kw) -> SweepOptions:
    base = dict(data=dataset, study="t", n_trials=2, timeout=None, storage=f"sqlite:///{tmp_path}/optuna.db",
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", epochs=1, subset=0, sets=TINY)
    return SweepOptions(**{**base, **kw})


def _runs(tmp_path, study="t"):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=[study], output_format="list")


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
    assert Config.from_dict(exported).flat() == Config.from_flat(winner.data.params).flat()
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
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    statuses = sorted(r.info.status for r in _runs(tmp_path))
    assert statuses == ["FAILED", "FINISHED"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shortcut_study.cli", *args]


def test_two_concurrent_workers_share_one_sqlite_study(dataset, tmp_path):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    init_tracking(tracking, "t")  # create the databases once, before the workers start
    open_storage(storage)
    cmd = _cli("sweep", "--data", str(dataset), "--study", "t", "--n-trials", "4", "--epochs", "1", "--subset", "0",
               "--storage", storage, "--tracking-uri", tracking, *sum((["--set", s] for s in TINY), []))
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err
    trials = optuna.load_study(study_name="t", storage=storage).trials
    assert len(trials) >= 4 and all(t.state == TrialState.COMPLETE for t in trials)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(trials)  # no trial run twice
    assert {r.info.run_id for r in _runs(tmp_path)} == set(run_ids)  # none lost


def test_killed_sweep_resumes_and_marks_the_trial_failed(dataset, tmp_path):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--data", str(dataset), "--study", "t", "--subset", "0", "--storage", storage,
              "--tracking-uri", tracking, "--heartbeat", "1", "--grace", "3", *sum((["--set", s] for s in TINY), [])]
    proc = subprocess.Popen(_cli("sweep", "--n-trials", "1", "--epochs", "400", *common), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            time.sleep(1)
            try:
                trials = optuna.load_study(study_name="t", storage=storage).trials
            except Exception:
                continue
            if trials and trials[0].state == TrialState.RUNNING and "mlflow_run_id" in trials[0].user_attrs:
                break
        else:
            pytest.fail("the sweep never started a trial")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(4)  # past the grace period
    assert main(["sweep", "--n-trials", "2", "--epochs", "1", *common]) == 0
    trials = optuna.load_study(study_name="t", storage=storage).trials
    assert trials[0].state == TrialState.FAIL and trials[-1].state == TrialState.COMPLETE
    killed = mlflow.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED"


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
