"""The tool outside a checkout, and its share of the CPU."""

from __future__ import annotations

import subprocess
import sys

import torch

from shortcut_study.config import make_config
from shortcut_study.runtime import configure_threads, usable_cpus
from shortcut_study.trials import core_shares


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shortcut_study.cli", *args]


def test_cli_runs_outside_the_checkout_with_stores_in_the_working_directory(dataset, tmp_path):
    tiny = ["--set", "train.batch_size=32", "--set", "train.eval_batch_size=64"]
    proc = subprocess.run(_cli("train", "--data", str(dataset), "--out", "run", "--preset", "fast", "--epochs", "1",
                               *tiny), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # the preset ships inside the package
    assert (tmp_path / "run" / "q1_model.pt").is_file()
    proc = subprocess.run(_cli("sweep", "--data", str(dataset), "--n-trials", "1", "--epochs", "1", "--subset", "0",
                               *tiny), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "studies" / "optuna.db").is_file() and (tmp_path / "mlruns" / "mlflow.db").is_file()


def test_threads_follow_the_usable_cpus_and_the_knob(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(0) == usable_cpus() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the OpenMP convention, e.g. two test processes on two cores
        assert configure_threads(0) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "lots")
        assert configure_threads(0) == usable_cpus()
        assert configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert make_config(sets=["train.threads=3"]).train.threads == 3


def test_workers_split_the_cores():
    assert core_shares(2, [0, 1]) == [{0}, {1}]
    assert core_shares(2, [0, 1, 2, 3]) == [{0, 1}, {2, 3}]
    assert core_shares(1, [0, 1]) == [{0, 1}]
    assert core_shares(3, [0, 1]) == [{0}, {1}, {0}]  # more workers than CPUs: single CPUs in turn
