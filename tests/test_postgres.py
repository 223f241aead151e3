"""Sweeps across machines, on real components: a PostgreSQL server (Optuna storage) and an MLflow
tracking server with proxied artifacts, started by the tests on loopback."""

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

from shortcut_study.server import free_port, start_mlflow_server, wait_for_http
from shortcut_study.storage import open_storage

from .conftest import kill_once_training

REPO = Path(__file__).resolve().parents[1]
TINY = ("train.batch_size=32", "train.eval_batch_size=64", "train.tta=none")


def _sweep(dataset, storage, tracking, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shortcut_study.cli", "sweep", "--data", str(dataset), "--study", "t",
            "--epochs", "1", "--subset", "0", "--storage", storage, "--tracking-uri", tracking,
            *sum((["--set", s] for s in TINY), []), *extra]


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    backend = postgres.create_db(f"mlflow_{os.getpid()}_{time.monotonic_ns() % 100000}")
    port = free_port()
    proc = start_mlflow_server(backend, tmp_path / "artifacts", "127.0.0.1", port, log=tmp_path / "mlflow.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, timeout=120, proc=proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_claim_lock_on_postgres_excludes_a_second_worker(pg_db):
    """The claim that keeps a study at exactly --n-trials must be a real lock on PostgreSQL."""
    import threading

    from shortcut_study.storage import ClaimLock

    first, second = ClaimLock(pg_db, "t"), ClaimLock(pg_db, "t")
    first.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()), daemon=True)
    waiter.start()
    assert not got.wait(2), "a second worker took the claim while the first held it"
    first.close()  # as a killed worker's dropped connection does
    assert got.wait(60)
    second.close()


def test_two_processes_initialise_a_fresh_postgres_study_at_once(dataset, pg_db, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    from shortcut_study.tracking import init_tracking

    init_tracking(tracking, "t")
    cmds = [_sweep(dataset, pg_db, tracking, "--n-trials", "2") for _ in range(2)]
    procs = [subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    trials = optuna.load_study(study_name="t", storage=open_storage(pg_db)).trials
    assert len(trials) == 2 and sum(bool(t.user_attrs.get("default")) for t in trials) == 1


def test_three_workers_on_postgres_and_an_mlflow_server(dataset, pg_db, mlflow_server, tmp_path):
    procs = [subprocess.Popen(_sweep(dataset, pg_db, mlflow_server, "--n-trials", "5"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    trials = optuna.load_study(study_name="t", storage=open_storage(pg_db)).trials
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 5
    # a fresh client, elsewhere: every run and its checkpoint through the server
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("t")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.trial != ''")
    assert {r.data.tags["trial"] for r in runs} == {str(t.number) for t in trials}
    parents = client.search_runs([exp.experiment_id], filter_string="tags.role = 'study'")
    assert len(parents) == 1  # one parent however many workers started at once
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    local = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="q1_model.pt",
                                                dst_path=str(tmp_path / "dl"))
    assert Path(local).stat().st_size > 100_000


def test_killed_worker_and_restarted_database(dataset, pg_db, postgres, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--heartbeat", "1", "--grace", "4"]
    kill_once_training(_sweep(dataset, pg_db, tracking, "--n-trials", "1", *common, "--epochs", "400"), pg_db,
                       tmp_path)
    worker = subprocess.Popen(_sweep(dataset, pg_db, tracking, "--n-trials", "4", *common), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # once a trial has finished, take the database away and bring it back
    deadline, storage = time.time() + 300, open_storage(pg_db)  # one storage: one connection pool
    while time.time() < deadline:
        time.sleep(0.5)
        if any(t.state == TrialState.COMPLETE for t in optuna.load_study(study_name="t", storage=storage).trials):
            break
    storage.engine.dispose()
    postgres.stop("immediate")
    time.sleep(3)
    postgres.start()
    out, err = worker.communicate(timeout=900)
    assert worker.returncode == 0, err
    assert "waiting for the storage" in out + err
    trials = optuna.load_study(study_name="t", storage=open_storage(pg_db)).trials
    assert trials[0].state == TrialState.FAIL  # the killed worker's trial
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4  # none lost, the target reached
    assert any(t.params == trials[0].params and t.state == TrialState.COMPLETE for t in trials[1:])
    mlflow.set_tracking_uri(tracking)
    assert mlflow.get_run(trials[0].user_attrs["mlflow_run_id"]).info.status == "FAILED"
