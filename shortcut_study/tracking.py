"""The few MLflow calls the rest of the tool uses.

MLflow 3 refuses a plain-folder store, so the default is a SQLite database inside `mlruns/` with
artifacts beside it; `mlflow ui` must be started with the same two locations (`make ui`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import CIFAR_CLASSES, NUM_DIGITS
from .errors import UserError
from .metrics import Scores
from .storage import file_lock, normalize_db_url

MLRUNS = Path("mlruns")  # under the working directory, as `mlflow` itself defaults
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS / 'mlflow.db'}"
ARTIFACT_ROOT = MLRUNS / "artifacts"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def init_tracking(uri: str | None, experiment: str) -> str:
    """Point MLflow at `uri` (created if needed, once, under a lock) and return the experiment id."""
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = normalize_db_url(uri or DEFAULT_TRACKING_URI)
    db = _sqlite_file(uri)
    if db is None and "://" not in uri:
        raise UserError(f"tracking URI {uri!r} has no scheme: use sqlite:///PATH.db, postgresql://… or http://…")
    lock = (db.parent if db else MLRUNS) / ".init.lock"
    if db:
        db.parent.mkdir(parents=True, exist_ok=True)
    remote = uri.startswith(("http://", "https://"))
    if remote:
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with file_lock(lock):
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is not None:
                return exp.experiment_id
            if remote:  # the server's own artifact store (mlflow-artifacts:), readable from every machine
                return mlflow.create_experiment(experiment)
            location = (ARTIFACT_ROOT / experiment).resolve().as_uri()
            return mlflow.create_experiment(experiment, artifact_location=location)
    except UserError:
        raise
    except Exception as exc:  # sqlalchemy / mlflow raise many kinds for a bad or unreachable store
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open the MLflow store {uri}: {msg[:200]} — check --tracking-uri") from None


def _check_server(uri: str) -> None:
    """A one-line error at once for a tracking server that does not answer (MLflow's client would
    retry for minutes)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            return
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach the MLflow tracking server {uri}: {reason} — start it (`make server`) "
                        "or fix --tracking-uri") from None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def confusion_figure(cm: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(10), CIFAR_CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(10), CIFAR_CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def log_confusion(cm: np.ndarray, name: str = "val_confusion") -> None:
    import matplotlib.pyplot as plt
    import mlflow

    fig = confusion_figure(cm, name.replace("_", " "))
    mlflow.log_figure(fig, f"{name}.png")
    plt.close(fig)
    buf = io.StringIO()
    np.savetxt(buf, cm, fmt="%d", delimiter=",", header=",".join(CIFAR_CLASSES), comments="")
    mlflow.log_text(buf.getvalue(), f"{name}.csv")


def log_group_table(scores: Scores, name: str) -> None:
    """Accuracy per (class, digit) cell of the crossed split as an MLflow table beside the confusion
    matrix (nothing when the split could not be crossed)."""
    import mlflow

    if scores.crossed is None:
        return
    cells = scores.cells()
    rows = {"class": [], "digit": [], "images": [], "accuracy": []}
    for c, cls in enumerate(CIFAR_CLASSES):
        for d in range(NUM_DIGITS):
            rows["class"].append(cls)
            rows["digit"].append(d)
            rows["images"].append(int((scores.labels == c).sum()))
            rows["accuracy"].append(float(cells[c, d]))
    mlflow.log_table(rows, name)


def log_epoch(record: dict[str, Any]) -> None:
    import mlflow

    metrics = {k: float(v) for k, v in record.items() if k != "epoch" and np.isfinite(v)}
    mlflow.log_metrics(metrics, step=int(record["epoch"]))


def end_run_failed(exc: BaseException) -> None:
    """Tag the active run FAILED with the error and end it, so it is never left RUNNING (the caller
    re-raises: the trial fails too)."""
    import mlflow

    mlflow.set_tags({"state": "FAILED", "error": str(exc)[:500]})
    mlflow.end_run(status="FAILED")


@contextlib.contextmanager
def tracked_trial(experiment_id: str, parent: str, run_name: str, tags: dict[str, str],
                  on_start: Any = None) -> Iterator[Any]:
    """One trial as an MLflow child run of `parent`, created with its tags (so a killed worker's
    run can be matched to its trial by `reconcile_failed_runs`): `on_start(run_id)` right after
    (the trial records its run id), then the block; the run ends tagged COMPLETE, KILLED on a
    prune, FAILED with the error on any other exception (re-raised: the trial fails too)."""
    import mlflow
    import optuna

    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags, parent_run_id=parent,
                          nested=True) as run:
        if on_start is not None:
            on_start(run.info.run_id)
        try:
            yield run
        except optuna.TrialPruned:
            mlflow.set_tag("state", "PRUNED")
            mlflow.end_run(status="KILLED")
            raise
        except Exception as exc:
            end_run_failed(exc)
            raise
        mlflow.set_tag("state", "COMPLETE")


def device_tag() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu x{os.cpu_count()}"
