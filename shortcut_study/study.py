"""The Optuna study: search space, objective (one training run = one MLflow run), storage, best run.

Several `sweep` processes pointed at one storage share the study: each draws from a sampler stream
of its own, claims a trial only while the study holds fewer than `--n-trials` counted (complete,
pruned or running) trials, and beats a heartbeat while it runs one (`trials.py`). A killed worker's
trial is failed once its grace period is over, its MLflow run marked FAILED, and its parameters run
again by the next free worker.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import SELECT_METRICS, Config, Param, make_config, set_value
from .errors import UserError
from .storage import DEFAULT_STORAGE, STUDIES, ClaimLock, open_storage, storage_unreachable
from .tracking import init_tracking
from .trials import (WorkerSettings, counted, creator_attr, ensure_parent_run, reconcile_failed_runs, run_shared_trials, shared_study,
                     worker_seed)

# Heartbeats and stale-trial failing are marked experimental but are Optuna's documented way.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# The sweep's objectives are the model-selection criteria (`train.select`), by the same names.
OBJECTIVES = {name: f"val_{metric}" for name, metric in SELECT_METRICS.items()}


# The search space shared by every method: key -> Param (default from the config, search range
# here). The chosen method's own hyperparameters (`method.*`, declared by its class) are added to
# it: a conditional search space. Adding a dimension is one line.
SEARCH_SPACE: dict[str, Param] = {
    "train.lr": Param(0.1, low=0.02, high=0.4, log=True),
    "train.weight_decay": Param(5e-4, low=5e-5, high=2e-3, log=True),
    "train.schedule": Param("cosine", choices=("cosine", "onecycle", "step")),
    "train.epochs": Param(10, low=6, high=14),
    "augment.flip": Param("patch", choices=("none", "patch", "image", "both")),
    "augment.erase_p": Param(0.0, low=0.0, high=0.5),
    "augment.erase_scale_max": Param(0.2, low=0.05, high=0.33),
    "augment.noise_sigma": Param(0.0, low=0.0, high=0.3),
}
# Digit-patch shuffle knows where the shortcut is: searched only when asked for (`--search-shuffle`),
# so a sweep of a debiasing method does not tune toward the intervention it is compared with.
SHUFFLE_KEY = "augment.digit_shuffle_p"
SHUFFLE_DIMENSION = {SHUFFLE_KEY: Param(1.0, low=0.0, high=1.0)}


def search_space(base: Config, opts: SweepOptions) -> dict[str, Param]:
    """The dimensions this sweep searches: the shared table (with digit shuffle when asked for) plus
    the method's own searchable ones, less what the user pinned with `--set` (or `--epochs`)."""
    space = {**SEARCH_SPACE, **(SHUFFLE_DIMENSION if opts.search_shuffle else {}),
             **{f"method.{k}": p for k, p in base.method_params().items() if p.search}}
    return {k: p for k, p in space.items() if not _pinned(opts, k)}


def base_sets(opts: SweepOptions) -> list[str]:
    """Every trial's config overrides: the user's `--set`, and for a method other than ERM no digit
    shuffle unless the user set or searches it (the config's default shuffles every digit, the
    course recipe's intervention; a debiasing method is studied without it)."""
    sets = list(opts.sets)
    method = make_config(sets=sets).train.method
    if method != "erm" and not opts.search_shuffle and not _pinned(opts, SHUFFLE_KEY):
        sets.append(f"{SHUFFLE_KEY}=0")
    return sets


def _pinned(opts: SweepOptions, key: str) -> bool:
    """Set by the user for every trial (`--set KEY=…`, or `--epochs`): not searched."""
    return key in {s.partition("=")[0].strip() for s in opts.sets} or (key == "train.epochs" and opts.epochs is not None)


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
    search_shuffle: bool = False  # also search augment.digit_shuffle_p


def trial_config(trial: optuna.Trial, opts: SweepOptions) -> Config:
    cfg = make_config(sets=base_sets(opts))
    for key, param in search_space(cfg, opts).items():
        set_value(cfg, key, param.suggest(trial, key))
    if opts.epochs is not None:
        cfg.train.epochs = opts.epochs
    cfg.train.subset = opts.subset
    if not _pinned(opts, "train.seed"):
        cfg.train.seed = trial.number  # a training seed of its own per trial, logged with its params
    cfg.train.select = opts.objective  # each epoch's model is selected by what the study maximises
    cfg.train.warmup_epochs = min(cfg.train.warmup_epochs, cfg.train.epochs)
    return cfg.validate()


def default_params(opts: SweepOptions) -> dict[str, Any]:
    """The untuned defaults as a first trial, so the sweep shows what tuning gained."""
    cfg = make_config(sets=base_sets(opts))
    flat = cfg.flat()
    return {key: flat[key] if key != "train.epochs" else param.default
            for key, param in search_space(cfg, opts).items()}


def _trial_runner(opts: SweepOptions, experiment_id: str, parent: str):
    """run_trial(trial) -> objective value: one training run, tracked as one MLflow child run."""
    import mlflow

    from .evaluate import confusion
    from .run import Run
    from .tracking import device_tag, git_commit, log_confusion, log_epoch, log_group_table, tracked_trial
    from .train import fit

    metric = OBJECTIVES[opts.objective]

    def run_trial(trial: optuna.Trial) -> float:
        cfg = trial_config(trial, opts)
        run_dir = STUDIES / opts.study / f"trial-{trial.number:04d}"
        tags = {"study": opts.study, "trial": str(trial.number), "git_commit": git_commit(), "device": device_tag(),
                "objective": opts.objective}
        # The tags go in with the run itself, so a worker killed at any moment leaves a run that
        # `reconcile_failed_runs` can match to its trial.
        def started(run_id: str) -> None:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("run_dir", str(run_dir))

        with tracked_trial(experiment_id, parent, f"trial-{trial.number}", tags, started):
            mlflow.log_params({**cfg.flat(), "trial_number": trial.number})

            def on_epoch(epoch: int, record: dict[str, float]) -> None:
                log_epoch(record)
                value = record.get(metric, math.nan)
                if not math.isfinite(value):
                    return
                try:
                    trial.report(value, epoch)
                    prune = trial.should_prune()
                except Exception as exc:  # a database outage must not fail a training trial (F1)
                    if not storage_unreachable(exc):
                        raise
                    print(f"storage unreachable at epoch {epoch} of trial {trial.number}: not reported, training "
                          "on", flush=True)
                    return
                if prune:
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} ({metric} {value:.2f})")

            result = fit(cfg, opts.data, run_dir, on_epoch=on_epoch, quiet=True)
            # The selected model's val scores come with the result: nothing is reloaded or re-scored.
            val = result.val_scores
            if val is not None:
                log_confusion(confusion(val.preds, val.labels), "val_confusion")
                log_group_table(val, "val_groups.json")
            run_files = Run(run_dir)
            mlflow.log_artifact(str(run_files.model_path))
            mlflow.log_artifact(str(run_files.history_path))
            best = {f"best_val_{k}": v for k, v in result.best.items() if math.isfinite(v)}
            # Summary metrics under their own names: the per-epoch keys hold each epoch's value.
            mlflow.log_metrics({**best, "best_epoch": result.best_epoch, "total_train_seconds": result.train_seconds,
                                "median_images_per_s": result.images_per_s})
            for key, value in result.best.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("images_per_s", result.images_per_s)
            return float(result.best.get(SELECT_METRICS[opts.objective], math.nan))

    return run_trial


def _open_study(opts: SweepOptions, create: bool) -> optuna.Study:
    storage = open_storage(opts.storage)
    if not create:
        try:
            return optuna.load_study(study_name=opts.study, storage=storage)
        except KeyError:
            raise UserError(f"no study {opts.study!r} in {opts.storage or DEFAULT_STORAGE} — run `make sweep` first") from None
    sampler = optuna.samplers.TPESampler(seed=worker_seed(opts.seed), n_startup_trials=6, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=3)
    # The untuned default is enqueued once, by the process that creates the study.
    study, differs = shared_study(storage, opts.study, "objective", opts.objective, sampler=sampler, pruner=pruner,
                                  on_create=lambda s: s.enqueue_trial(default_params(opts), user_attrs={"default": True}))
    if differs:
        raise UserError(f"study {opts.study!r} was created with objective {creator_attr(study, 'objective')!r}, not "
                        f"{opts.objective!r} — use another --study name or the same --objective")
    return study


def study_parent_run(study: optuna.Study, experiment_id: str, opts: SweepOptions) -> str:
    """The study's parent MLflow run (its settings; the best trial so far; the optimisation plots)."""
    settings = {"n_trials": opts.n_trials, "objective": opts.objective, "subset": opts.subset,
                "epochs": "searched" if opts.epochs is None else opts.epochs, "sets": " ".join(opts.sets) or "-",
                "sampler": "TPE (constant liar, a seed per worker)", "pruner": "median (4 startup trials, 3 warm-up epochs)"}
    return ensure_parent_run(study, experiment_id, f"study {opts.study}", {"study": opts.study, "role": "study"}, settings)


def update_parent_run(study: optuna.Study, parent: str, final: bool = False) -> None:
    """The best trial so far on the parent run; with `final`, the history and importance plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        top = best_trial(study)
    except UserError:
        return
    client.log_metric(parent, "best_value", top.value, step=len(study.trials))
    client.set_tag(parent, "best_trial", str(top.number))
    client.log_dict(parent, {"trial": top.number, "value": top.value, "params": top.params,
                             "mlflow_run_id": top.user_attrs.get("mlflow_run_id")}, "best_trial.json")
    if final:
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
        client.log_figure(parent, ax.figure, "optimization_history.png")
        plt.close(ax.figure)
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 3:
            try:
                ax = optuna.visualization.matplotlib.plot_param_importances(study)
                client.log_figure(parent, ax.figure, "param_importances.png")
                plt.close(ax.figure)
            except (RuntimeError, ValueError):
                pass


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def validate_sweep(opts: SweepOptions) -> None:
    """Every option checked before any trial: a bad one is a one-line error, not N failed trials."""
    if opts.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {opts.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if not opts.study or not all(c.isalnum() or c in "-_." for c in opts.study) or opts.study.startswith("."):
        raise UserError(f"--study {opts.study!r}: use letters, digits, '-', '_' or '.' (it names a folder under "
                        f"{STUDIES}/ and an MLflow experiment)")
    for name, value, low in (("--n-trials", opts.n_trials, 1), ("--heartbeat", opts.heartbeat, 1),
                             ("--subset", opts.subset, 0)):
        if value < low:
            raise UserError(f"{name} must be >= {low} (got {value})")
    if opts.grace <= opts.heartbeat:
        raise UserError(f"--grace must exceed --heartbeat ({opts.grace} <= {opts.heartbeat}): a live trial "
                        "would be failed between two heartbeats")
    if opts.timeout is not None and opts.timeout < 0:
        raise UserError(f"--timeout must be >= 0 seconds, 0 = none (got {opts.timeout})")
    extra = [f"train.subset={opts.subset}"] + ([f"train.epochs={opts.epochs}"] if opts.epochs is not None else [])
    make_config(sets=list(opts.sets) + extra)  # a bad --set, --epochs or --subset fails here


def sweep(opts: SweepOptions) -> str:
    """Run (or resume) the study until it holds `n_trials` complete or pruned trials (failed ones
    do not count and are run again) or `timeout` passes."""
    validate_sweep(opts)
    from .data.layout import load_split

    load_split(opts.data, "val")  # fail fast on a missing dataset, before any trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(opts, create=True)
    experiment_id = init_tracking(opts.tracking_uri, opts.study)
    claim = ClaimLock(opts.storage or DEFAULT_STORAGE, opts.study)
    claim.acquire()  # workers starting together: one makes the parent run, the others find it
    try:
        parent = study_parent_run(study, experiment_id, opts)
    finally:
        claim.release()
    pinned = sorted({s.partition("=")[0].strip() for s in opts.sets} & (set(SEARCH_SPACE) | {SHUFFLE_KEY}))
    if pinned:
        print(f"not searched (pinned by --set): {', '.join(pinned)}", flush=True)
    if f"{SHUFFLE_KEY}=0" in base_sets(opts) and not _pinned(opts, SHUFFLE_KEY):
        print("digit shuffle off for every trial (a debiasing method is studied without it; "
              "--search-shuffle or --set augment.digit_shuffle_p=P to change that)", flush=True)
    run_trial = _trial_runner(opts, experiment_id, parent)
    deadline = time.monotonic() + opts.timeout if opts.timeout else math.inf

    def next_trial(study: optuna.Study) -> optuna.Trial | None:
        return study.ask() if counted(study) < opts.n_trials else None

    def after_trial(frozen: optuna.trial.FrozenTrial) -> None:
        _print_trial(study, frozen)
        update_parent_run(study, parent)

    run_shared_trials(study, claim, next_trial, run_trial, WorkerSettings(
        experiment_id=experiment_id, heartbeat=opts.heartbeat, grace=opts.grace, deadline=deadline,
        storage=opts.storage or DEFAULT_STORAGE), after_trial)
    update_parent_run(study, parent, final=True)
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
        lines.append(f"best trial {best.number}: {best.value:.2f} (conflicting "
                     f"{best.user_attrs.get('conflicting_acc', math.nan):.2f})")
    if default:
        lines.append(f"untuned default (trial {default[0].number}): {default[0].value:.2f}")
    return "\n".join(lines)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        raise UserError(f"study {study.study_name!r} has no finished trial yet — run `make sweep` first")
    return max(complete, key=lambda t: (t.value, t.user_attrs.get("conflicting_acc", -math.inf)))


def trial_run_config(params: dict[str, str]) -> Config:
    """The config a trial's MLflow run was trained with (its params, less `trial_number`)."""
    return Config.from_flat({k: v for k, v in params.items() if k != "trial_number"})


def best(data: str | Path, study_name: str, storage: str | None, tracking_uri: str | None, out: str | Path) -> str:
    """Export the best finished run's checkpoint and test predictions into `out`."""
    import mlflow

    from .evaluate import export_submission

    study = _open_study(SweepOptions(data=Path(data), study=study_name, storage=storage), create=False)
    trial = best_trial(study)
    reconcile_failed_runs(study, init_tracking(tracking_uri, study_name))
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
        info = {"run_id": run_id, "trial": trial.number, "study": study_name, "value": trial.value,
                "params": trial.params,
                "metrics": {k: v for k, v in run.data.metrics.items() if k.startswith("best_")}}
        try:
            n = export_submission(local, trial_run_config(run.data.params), split_dir(Path(data), "test"), out,
                                  extra={"best_run.json": json.dumps(info, indent=2, sort_keys=True) + "\n"})
        except UserError as exc:
            if str(local) not in str(exc):
                raise
            raise UserError(f"the q1_model.pt artifact of MLflow run {run_id} (trial {trial.number} of study "
                            f"{study_name}) is not a usable checkpoint: {str(exc).replace(str(local), 'it')}") from None
    lines = [f"best run {run_id} (trial {trial.number} of study {study_name}): objective {trial.value:.2f}"]
    lines += [f"  {k} = {v}" for k, v in sorted(trial.params.items())]
    lines += [f"  {k} = {v:.2f}" for k, v in sorted(info["metrics"].items())]
    lines.append(f"wrote {out / 'q1_model.pt'} and {out / 'q1_test.txt'} ({n} predictions)")
    return "\n".join(lines)
