"""The Optuna study: search space, objective (one training run = one MLflow run), storage, best run.

Several `sweep` processes pointed at one storage share the study (Optuna hands each a distinct
trial). A killed sweep leaves its trial RUNNING; heartbeats mark it FAIL once its grace period is
over, and the next sweep marks its MLflow run failed too.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from .config import REPO_ROOT, Config, make_config, set_value
from .errors import UserError, write_text_atomic
from .tracking import file_lock, init_tracking

# Heartbeats and stale-trial failing are marked experimental but are Optuna's documented way.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

STUDIES = REPO_ROOT / "studies"
DEFAULT_STORAGE = f"sqlite:///{STUDIES / 'optuna.db'}"
OBJECTIVES = {"val_acc": "val_acc", "worst_group": "val_worst_group_acc"}
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


@dataclass(frozen=True)
class Dim:
    """One searched config value: a float/int range (optionally log-scaled) or a set of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    integer: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


# The search space: adding a dimension is one line.
SEARCH_SPACE: tuple[Dim, ...] = (
    Dim("train.lr", 0.02, 0.4, log=True),
    Dim("train.weight_decay", 5e-5, 2e-3, log=True),
    Dim("train.schedule", choices=("cosine", "onecycle", "step")),
    Dim("train.epochs", 6, 14, integer=True),
    Dim("augment.flip", choices=("none", "patch", "image", "both")),
    Dim("augment.erase_p", 0.0, 0.5),
    Dim("augment.erase_scale_max", 0.05, 0.33),
    Dim("augment.noise_sigma", 0.0, 0.3),
    Dim("augment.digit_shuffle_p", 0.0, 1.0),
)


@dataclass
class SweepOptions:
    data: Path
    study: str = "shortcut"
    n_trials: int = 24
    timeout: float | None = 40 * 60
    storage: str | None = None
    tracking_uri: str | None = None
    epochs: int | None = None  # fixed epochs; None = searched
    subset: int = 15_000
    objective: str = "val_acc"
    seed: int = 0
    sets: tuple[str, ...] = ()  # base config overrides for every trial
    heartbeat: int = 30
    grace: int = 90


def open_storage(url: str | None, heartbeat: int = 30, grace: int = 90) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: any RDB URL (SQLite default) or a `.journal` file path."""
    url = url or DEFAULT_STORAGE
    if url.endswith(".journal") and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise UserError(f"unknown storage URL {url!r}: use sqlite:///PATH.db, postgresql://USER@HOST/DB, "
                        "mysql://… or a PATH.journal file")
    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy writer, not "database is locked"
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with file_lock(STUDIES / ".init.lock"):  # schema creation races between fresh workers
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                              grace_period=grace)
    except ImportError as exc:
        raise UserError(f"storage {url}: database driver missing ({exc.name}) — install it, e.g. "
                        "`uv add psycopg2-binary` for PostgreSQL") from None
    except Exception as exc:  # sqlalchemy OperationalError / ArgumentError and friends
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot reach storage {url}: {first[:200]} — start the database or fix --storage") from None


def trial_config(trial: optuna.Trial, opts: SweepOptions) -> Config:
    cfg = make_config(sets=list(opts.sets))
    for dim in SEARCH_SPACE:
        if dim.key == "train.epochs" and opts.epochs is not None:
            continue
        set_value(cfg, dim.key, dim.suggest(trial))
    if opts.epochs is not None:
        cfg.train.epochs = opts.epochs
    cfg.train.subset = opts.subset
    cfg.train.warmup_epochs = min(cfg.train.warmup_epochs, cfg.train.epochs)
    return cfg.validate()


def default_params(opts: SweepOptions) -> dict[str, Any]:
    """The untuned defaults as a first trial, so the sweep shows what tuning gained."""
    cfg = make_config(sets=list(opts.sets))
    flat = cfg.flat()
    params = {d.key: flat[d.key] for d in SEARCH_SPACE if not (d.key == "train.epochs" and opts.epochs is not None)}
    if "train.epochs" in params:
        params["train.epochs"] = 10
    return params


def _objective(opts: SweepOptions, experiment_id: str):
    import mlflow

    from .data.layout import load_split
    from .evaluate import confusion, evaluate_split
    from .model import load_model
    from .runtime import resolve_runtime
    from .tracking import device_tag, git_commit, log_confusion, log_epoch
    from .train import fit

    metric = OBJECTIVES[opts.objective]

    def objective(trial: optuna.Trial) -> float:
        cfg = trial_config(trial, opts)
        run_dir = STUDIES / opts.study / f"trial-{trial.number:04d}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"trial-{trial.number}") as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("run_dir", str(run_dir))
            mlflow.log_params(cfg.flat())
            mlflow.set_tags({"study": opts.study, "trial": trial.number, "git_commit": git_commit(),
                             "device": device_tag(), "objective": opts.objective})

            def on_epoch(epoch: int, record: dict[str, float]) -> None:
                log_epoch(record)
                value = record.get(metric, math.nan)
                if not math.isfinite(value):
                    return
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} ({metric} {value:.2f})")

            try:
                result = fit(cfg, opts.data, run_dir, on_epoch=on_epoch, quiet=True)
            except optuna.TrialPruned:
                mlflow.set_tag("state", "PRUNED")
                mlflow.end_run(status="KILLED")
                raise
            except Exception as exc:
                mlflow.set_tags({"state": "FAILED", "error": str(exc)[:500]})
                mlflow.end_run(status="FAILED")
                raise
            rt = resolve_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last)
            val = load_split(opts.data, "val", cfg.geometry.canvas)
            best_model = load_model(run_dir / "q1_model.pt", rt.device)
            _, preds = evaluate_split(best_model, val, rt, cfg.train.eval_batch_size, cfg.train.tta, cfg.geometry)
            log_confusion(confusion(preds, val.labels.numpy()), "val_confusion")
            mlflow.log_artifact(str(run_dir / "q1_model.pt"))
            mlflow.log_artifact(str(run_dir / "history.csv"))
            best = {f"best_val_{k}": v for k, v in result.best.items() if math.isfinite(v)}
            mlflow.log_metrics({**best, "best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
                                "images_per_s": result.images_per_s})
            mlflow.set_tag("state", "COMPLETE")
            for key in ("acc", "conflicting_acc", "aligned_acc", "worst_group_acc"):
                trial.set_user_attr(key, result.best.get(key, math.nan))
            return float(result.best["acc"] if opts.objective == "val_acc" else result.best.get("worst_group_acc", math.nan))

    return objective


def _open_study(opts: SweepOptions, create: bool) -> optuna.Study:
    storage = open_storage(opts.storage, opts.heartbeat, opts.grace)
    if create:
        with file_lock(STUDIES / ".init.lock"):
            study = optuna.create_study(
                study_name=opts.study, storage=storage, direction="maximize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=6),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=3))
            if not study.user_attrs.get("objective"):
                study.set_user_attr("objective", opts.objective)
                study.enqueue_trial(default_params(opts), user_attrs={"default": True})
    else:
        try:
            study = optuna.load_study(study_name=opts.study, storage=storage)
        except KeyError:
            raise UserError(f"no study {opts.study!r} in {opts.storage or DEFAULT_STORAGE} — run `make sweep` first") from None
    made_for = study.user_attrs.get("objective")
    if create and made_for != opts.objective:
        raise UserError(f"study {opts.study!r} was created with objective {made_for!r}, not {opts.objective!r} — "
                        "use another --study name or the same --objective")
    return study


def reconcile_failed_runs(study: optuna.Study) -> int:
    """Mark the MLflow runs of trials Optuna has failed (killed sweeps) as FAILED, not RUNNING."""
    from mlflow.tracking import MlflowClient

    client, fixed = MlflowClient(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "state", "FAILED")
                client.set_terminated(run_id, status="FAILED")
                fixed += 1
        except Exception:
            continue  # a run deleted by hand is not ours to fix
    return fixed


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def sweep(opts: SweepOptions) -> str:
    """Run (or resume) the study until it holds `n_trials` finished trials or `timeout` passes."""
    if opts.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {opts.objective!r}: choose one of {sorted(OBJECTIVES)}")
    if opts.n_trials < 1:
        raise UserError(f"--n-trials must be >= 1 (got {opts.n_trials})")
    make_config(sets=list(opts.sets))  # fail fast on a bad --set
    from .data.layout import load_split

    load_split(opts.data, "val")  # fail fast on a missing dataset, before any trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(opts, create=True)
    experiment_id = init_tracking(opts.tracking_uri, opts.study)
    optuna.storages.fail_stale_trials(study)  # a no-op for storages without heartbeats
    reconcile_failed_runs(study)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done < opts.n_trials:
        study.optimize(_objective(opts, experiment_id), timeout=opts.timeout, catch=(Exception,),
                       callbacks=[MaxTrialsCallback(opts.n_trials, states=FINISHED), _print_trial],
                       show_progress_bar=False)
    return summary(study)


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial, so a long sweep shows its progress."""
    secs = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else math.nan
    value = f"{trial.value:.2f}" if trial.value is not None else "–"
    try:
        best = f"{study.best_value:.2f}"
    except ValueError:
        best = "–"
    print(f"trial {trial.number:>3} {trial.state.name:<8} objective {value:>6} (best {best}) {secs:5.0f} s", flush=True)


def summary(study: optuna.Study) -> str:
    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in FINISHED}
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items())]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    default = [t for t in complete if t.user_attrs.get("default")]
    if complete:
        best = best_trial(study)
        lines.append(f"best trial {best.number}: {best.value:.2f} (conflicting {best.user_attrs.get('conflicting_acc', math.nan):.2f})")
    if default:
        lines.append(f"untuned default (trial {default[0].number}): {default[0].value:.2f}")
    return "\n".join(lines)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        raise UserError(f"study {study.study_name!r} has no finished trial yet — run `make sweep` first")
    return max(complete, key=lambda t: (t.value, t.user_attrs.get("conflicting_acc", -math.inf)))


def best(data: str | Path, study_name: str, storage: str | None, tracking_uri: str | None, out: str | Path) -> str:
    """Export the best finished run's checkpoint and test predictions into `out`."""
    import mlflow

    from .evaluate import export_submission

    study = _open_study(SweepOptions(data=Path(data), study=study_name, storage=storage), create=False)
    trial = best_trial(study)
    init_tracking(tracking_uri, study_name)
    reconcile_failed_runs(study)
    run_id = trial.user_attrs["mlflow_run_id"]
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="q1_model.pt", dst_path=tmp)
        except Exception as exc:
            raise UserError(f"cannot fetch q1_model.pt of run {run_id}: {str(exc)[:200]} — is --tracking-uri "
                            "the sweep's?") from None
        from .data.layout import split_dir

        run = mlflow.get_run(run_id)
        n = export_submission(local, Config.from_flat(run.data.params), split_dir(Path(data), "test"), out)
    info = {"run_id": run_id, "trial": trial.number, "study": study_name, "value": trial.value,
            "params": trial.params, "metrics": {k: v for k, v in run.data.metrics.items() if k.startswith("best_")}}
    write_text_atomic(out / "best_run.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    lines = [f"best run {run_id} (trial {trial.number} of study {study_name}): objective {trial.value:.2f}"]
    lines += [f"  {k} = {v}" for k, v in sorted(trial.params.items())]
    lines += [f"  {k} = {v:.2f}" for k, v in sorted(info["metrics"].items())]
    lines.append(f"wrote {out / 'q1_model.pt'} and {out / 'q1_test.txt'} ({n} predictions)")
    return "\n".join(lines)
