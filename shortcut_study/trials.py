"""Trials shared by several sweep workers on one storage, on one host or many: claiming a trial so
the study ends at exactly its target, a heartbeat per running trial, and failing and retrying the
trials of killed workers.

The same mechanism serves every storage (SQLite, PostgreSQL, Optuna's journal file): the heartbeat
is a trial user attribute (`heartbeat_at`, seconds since the epoch) written by a thread every
`interval` seconds; a RUNNING trial whose last heartbeat — or, killed before its first, whose start —
is older than the grace period is failed, and Optuna's `RetryHeartbeatStaleTrialCallback` enqueues
its parameters again. Hosts are assumed to keep their clocks in sync (NTP) to well within the grace.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .config import fingerprint_differences
from .errors import UserError, interrupts_unwrapped
from .storage import ClaimLock, storage_unreachable

# Optuna's retry callback is marked experimental, but it is Optuna's documented pattern.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_ATTR = "heartbeat_at"
SILENT_ATTR = "failed_as_silent_at"  # set just before a silent trial is failed: its retry is owed
PARENT_TAG = "parent_of"  # the study a parent MLflow run belongs to (found again after a kill)
INSTANCE_ATTR = "instance"  # a token made with a shared study: its parent run's PARENT_TAG names it
# Trials that count toward `--n-trials`: a failed trial does not, so a study can be completed
# after a fix, and a killed one is retried.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial_id: int, interval: float) -> Iterator[None]:
    """Write the trial's heartbeat now and every `interval` seconds until the block ends."""
    storage = study._storage  # noqa: SLF001 — Optuna's storage API is public; the attribute is not
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # the trial finished meanwhile, or the database is away: try again
                continue

    storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _last_sign_of_life(trial: FrozenTrial) -> float:
    """The later of its last heartbeat and its start (a retried trial inherits the failed one's
    attributes, heartbeat included)."""
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return max(float(beat), start) if isinstance(beat, (int, float)) else start


def fail_stale(study: optuna.Study, grace: float, on_failed: Callable[[FrozenTrial], None] | None = None,
               retry: bool = True) -> list[FrozenTrial]:
    """Fail every RUNNING trial silent for longer than `grace` seconds; enqueue each one's
    parameters again (Optuna's retry pattern) when `retry`; call `on_failed` for each. Call it with
    the claim held. A trial is marked silent before it is failed, so a worker killed between the
    failing and the enqueueing leaves a mark the next pass finds: its parameters are never lost."""
    storage = study._storage  # noqa: SLF001
    now, failed = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - _last_sign_of_life(trial) <= grace:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, SILENT_ATTR, now)  # noqa: SLF001
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):  # noqa: SLF001
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        fault_point("silent_trial_failed")
        failed.append(storage.get_trial(trial._trial_id))  # noqa: SLF001
    if retry:
        _retry_silent(study)
    for frozen in failed:
        if on_failed is not None:
            on_failed(frozen)
    return failed


def _retry_silent(study: optuna.Study) -> None:
    """Enqueue again the parameters of every trial failed as silent that has no retry yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    for trial in trials:
        if trial.state == TrialState.FAIL and SILENT_ATTR in trial.user_attrs and trial.number not in retried:
            RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)


def fault_point(name: str) -> None:
    """Die here, as a killed machine would, when the tests ask for it (SHORTCUT_STUDY_FAULT=name):
    the exact code points where a kill used to lose or duplicate work."""
    if os.environ.get("SHORTCUT_STUDY_FAULT") == name:
        os.kill(os.getpid(), 9)


def worker_seed(base: int) -> int:
    """A sampler seed of its own for each worker process (host, pid, start time): workers that
    share a study must not draw the same parameters."""
    import socket

    return zlib.crc32(f"{base}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}".encode())


def core_shares(n: int, cpus: list[int] | None = None) -> list[set[int]]:
    """`cpus` (default: this process's) split into n disjoint, near-equal shares; with more
    workers than CPUs, shares are single CPUs handed out in turn."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if n <= len(cpus):
        return [set(cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n]) for i in range(n)]
    return [{cpus[i % len(cpus)]} for i in range(n)]


def gpu_shares(n: int, visible: str | None = None, count: int | None = None) -> list[str | None]:
    """`CUDA_VISIBLE_DEVICES` for each of n workers: with several GPUs, one each in turn (as
    DomainBed's multi-GPU launcher hands them out); None (inherit) with one GPU or none. `visible`
    is the parent's own CUDA_VISIBLE_DEVICES, `count` the GPUs torch sees (looked up when None)."""
    if visible is not None and visible.strip():
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        if count is None:
            import torch

            count = torch.cuda.device_count()
        devices = [str(i) for i in range(count)]
    if len(devices) < 2:
        return [None] * n
    return [devices[i % len(devices)] for i in range(n)]


def spawn_workers(argv: list[str], n: int) -> tuple[int, str]:
    """Run `n` copies of the command `argv` (a `sweep` without --workers) side by side, each pinned
    to its share of the cores so their threads split the machine instead of oversubscribing it, and
    to a GPU of its own when there are several; return the worst exit code and the first `error:`
    line a worker printed. Everything else the workers print is passed through as it comes; their
    error lines are held back, so a failure shows one line (the caller's), not one per worker."""
    import subprocess
    import sys

    procs, errors, relays = [], [], []
    for share, gpu in zip(core_shares(n), gpu_shares(n, os.environ.get("CUDA_VISIBLE_DEVICES"))):
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
        proc = subprocess.Popen([sys.executable, "-m", "shortcut_study.cli", *argv], env=env, stderr=subprocess.PIPE,
                                text=True, errors="replace",
                                preexec_fn=lambda share=share: os.sched_setaffinity(0, share))
        procs.append(proc)

        def relay(stream=proc.stderr) -> None:
            for line in stream:
                if line.startswith("error: "):
                    errors.append(line.removeprefix("error: ").strip())
                else:
                    sys.stderr.write(line)
                    sys.stderr.flush()

        relays.append(threading.Thread(target=relay, daemon=True))
        relays[-1].start()
    codes = []
    try:
        for p in procs:
            codes.append(p.wait())
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    for t in relays:
        t.join(timeout=5)
    return max(codes), (errors[0] if errors else "")


# ---- the worker loop shared by `sweep` and `compare` ---------------------------------------------
# A worker stops after this many failed trials in a row and reports the first error.
MAX_FAILURES_IN_A_ROW = 3
# Seconds a worker waits for a database that went away before it gives up.
STORAGE_PATIENCE = 600


@dataclass
class WorkerSettings:
    experiment_id: str  # MLflow experiment whose runs of failed trials are ended as FAILED
    heartbeat: float
    grace: float
    deadline: float  # time.monotonic() after which no new trial is claimed
    storage: str  # for messages
    retry: bool = True  # enqueue a silent trial's parameters again (the sweep; compare re-picks cells itself)


def raised_since(trial: FrozenTrial, since: float) -> bool:
    """The trial's run raised (its error recorded as the `error` user attribute) and it started at
    or after `since`; a killed worker's trial fails without an error."""
    return (trial.state == TrialState.FAIL and "error" in trial.user_attrs
            and trial.datetime_start is not None and trial.datetime_start.timestamp() >= since)


def claimed_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, known from the moment it is claimed. A trial just claimed has not
    suggested them yet (the claim is released as it starts): an enqueued trial's are still only its
    fixed parameters, and a peer reading `params` alone would claim the same job again."""
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def next_listed(study: optuna.Study, jobs: list[dict[str, Any]], since: float) -> optuna.Trial | None:
    """The next of a fixed list of jobs to run (call with the claim held): an enqueued one left
    waiting by a process that died; else the first job (identified by its `job` number) that no
    trial has finished or is running, nor failed with an error since `since` (a deterministic error
    is not retried in a loop; the next command retries it once, after a fix); None when none is left."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return study.ask()
    taken = {claimed_params(t).get("job") for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)}
    taken |= {claimed_params(t).get("job") for t in trials if raised_since(t, since)}
    for job in jobs:
        if job["job"] not in taken:
            study.enqueue_trial(job, skip_if_exists=False)
            return study.ask()
    return None


def creator_attr(study: optuna.Study, key: str, tries: int = 50) -> Any:
    """A study attribute its creating process writes right after creating it: another process
    that found the study may look before it is there, so wait for it (up to 10 s)."""
    for _ in range(tries):
        value = study.user_attrs.get(key)
        if value is not None:
            return value
        time.sleep(0.2)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)  # noqa: SLF001
    return None


def shared_study(storage: optuna.storages.BaseStorage, name: str, key: str, made_for: Any,
                 on_create: Callable[[optuna.Study], None] | None = None, **study_args: Any) -> tuple[optuna.Study, list[str]]:
    """The study `name`, made by whichever process gets there first: it records `made_for` (what the
    study is for: an objective, a grid, a benchmark) under `key` and runs `on_create` once (the
    database's unique name decides, however many workers start together). Returns the study and
    where its creator's record differs from `made_for` (`fingerprint_differences`; empty = the same)."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", **study_args)
        study.set_user_attr(INSTANCE_ATTR, uuid.uuid4().hex)  # tells it from a namesake in another storage
        study.set_user_attr(key, made_for)
        if on_create is not None:
            on_create(study)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, **study_args)
    recorded = creator_attr(study, key)
    return study, fingerprint_differences({} if recorded is None else recorded, made_for)


def ensure_parent_run(study: optuna.Study, experiment_id: str, run_name: str, tags: dict[str, str],
                      settings: dict[str, Any]) -> str:
    """The study's one parent MLflow run, made by the first worker and found by the others through
    a study attribute. Call it with the claim lock held: workers start together. A creator killed
    between creating the run and recording it left a run tagged `parent_of`: it is adopted (ended
    FINISHED and recorded), so a study never has two parents or one RUNNING forever."""
    from mlflow.entities import Param as RunParam
    from mlflow.tracking import MlflowClient

    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        return run_id
    client = MlflowClient()
    # The tag names this study, not only its name: another storage's study of the same name (a part
    # measured on a storage of its own) has its own parent run in the same MLflow experiment.
    owner = f"{study.study_name}@{study.user_attrs[INSTANCE_ATTR]}" if INSTANCE_ATTR in study.user_attrs else study.study_name
    orphans = client.search_runs([experiment_id], filter_string=f"tags.{PARENT_TAG} = '{owner}'",
                                 max_results=1, order_by=["attributes.start_time ASC"])
    if orphans:
        run_id = orphans[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={**tags, PARENT_TAG: owner}).info.run_id
        fault_point("parent_run_created")
    client.log_batch(run_id, params=[RunParam(k, str(v)) for k, v in settings.items()])
    client.set_terminated(run_id, status="FINISHED")
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def reconcile_failed_runs(study: optuna.Study, experiment_id: str) -> int:
    """End as FAILED the MLflow runs still RUNNING whose trial Optuna has failed (killed workers),
    matched by the `trial` tag each run is created with."""
    from mlflow.tracking import MlflowClient

    failed = {str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    if not failed:
        return 0
    client, fixed = MlflowClient(), 0
    # RUNNING: a worker killed mid-trial. FINISHED with state COMPLETE: killed after its run ended but
    # before the result reached Optuna — the trial is failed and run again, so the run is too.
    runs = [run for status in ("RUNNING", "FINISHED")
            for run in client.search_runs([experiment_id], filter_string=f"attributes.status = '{status}'",
                                          max_results=5000)]
    for run in runs:
        if run.data.tags.get("study") == study.study_name and run.data.tags.get("trial") in failed:
            try:
                client.set_tag(run.info.run_id, "state", "FAILED")
                client.set_terminated(run.info.run_id, status="FAILED")
                fixed += 1
            except Exception:
                continue  # deleted by hand, or ended by another worker meanwhile
    return fixed


def tell_patiently(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None) -> None:
    """Tell a trial's end, waiting for a database that is away: a result is delayed, never lost."""
    away_since = time.monotonic()
    while True:
        try:
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            return
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            return  # failed meanwhile by another worker (it was silent past the grace period)
        except Exception as exc:
            if not storage_unreachable(exc) or time.monotonic() - away_since > STORAGE_PATIENCE:
                raise
            print(f"storage unreachable while trial {trial.number} ended: waiting for the storage, retrying in 5 s",
                  flush=True)
            time.sleep(5)


def _run_one(study: optuna.Study, trial: optuna.Trial, run_trial: Callable[[optuna.Trial], float],
             claim: ClaimLock, settings: WorkerSettings) -> tuple[FrozenTrial, str | None]:
    """Run a claimed trial with a heartbeat and tell its end; the error of a failed trial, else None.
    Ask and tell are ours, not `study.optimize`'s, so a database that is away when the trial ends
    delays the tell instead of losing the result."""
    value, error = None, None
    with heartbeat(study, trial._trial_id, settings.heartbeat):  # noqa: SLF001
        claim.release()  # the trial exists and beats: the next worker may count and claim
        try:
            with interrupts_unwrapped():  # a wrapped Ctrl-C stops the worker, not only this trial
                value, state = run_trial(trial), TrialState.COMPLETE
            fault_point("run_finished_untold")  # the MLflow run has ended FINISHED; Optuna does not know yet
            if not math.isfinite(value):
                state, error = TrialState.FAIL, f"objective is {value}"
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as exc:
            state = TrialState.FAIL
            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):  # recorded with the trial (the storage may be away)
                trial.set_user_attr("error", error[:300])
        except KeyboardInterrupt:
            tell_patiently(study, trial, TrialState.FAIL, None)  # stopped by hand: failed now, not after the grace
            raise
        # Told while the heartbeat still beats: a result waiting out a database outage is not
        # mistaken for a silent trial by a peer.
        tell_patiently(study, trial, state, value)
    return study._storage.get_trial(trial._trial_id), error  # noqa: SLF001


def run_shared_trials(study: optuna.Study, claim: ClaimLock, next_trial: Callable[[optuna.Study], optuna.Trial | None],
                      run_trial: Callable[[optuna.Trial], float], settings: WorkerSettings,
                      after_trial: Callable[[FrozenTrial], None], wait: bool = True) -> None:
    """One worker's loop over a study shared with others: fail silent trials (and their MLflow
    runs), claim the next trial (`next_trial`, called with the claim held: a new trial, or None when
    nothing is left to claim), run it, repeat; with `wait`, wait for the others' running trials to
    end before leaving, since a silent one will be failed and rerun (without, leave at once: the
    caller has other studies to serve and comes back). A database that goes away is waited for,
    up to STORAGE_PATIENCE seconds; MAX_FAILURES_IN_A_ROW failed trials end the worker."""
    errors: list[str] = []
    in_a_row = 0
    away_since: float | None = None
    try:
        while time.monotonic() < settings.deadline:
            try:
                reconcile_failed_runs(study, settings.experiment_id)
                claim.acquire()
                fail_stale(study, settings.grace, retry=settings.retry)  # under the claim: one retry each
                trial = next_trial(study)
                if trial is None:
                    claim.release()
                    if not wait or not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                        break
                    time.sleep(min(settings.heartbeat, 5))  # others' trials: a silent one will be failed, then rerun
                    continue
                frozen, error = _run_one(study, trial, run_trial, claim, settings)
                claim.release()
                after_trial(frozen)
                away_since = None
            except Exception as exc:
                if not storage_unreachable(exc):
                    raise
                claim.reset()
                away_since = away_since or time.monotonic()
                if time.monotonic() - away_since > STORAGE_PATIENCE:
                    raise UserError(f"storage {settings.storage} unreachable for {STORAGE_PATIENCE} s — start the "
                                    "database and run the command again (finished trials are kept)") from None
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
                print(f"storage unreachable ({first}): waiting for the storage, retrying in 5 s", flush=True)
                time.sleep(5)
                continue
            if error is not None:
                errors.append(error)
                in_a_row += 1
                if in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise UserError(f"{in_a_row} trials failed in a row, the first with: {errors[-in_a_row][:300]}")
            else:
                in_a_row = 0
        # The last pass may have failed a silent trial (a killed worker's whose cell needs no
        # rerun) and left at once, or at the deadline: its MLflow run must not stay RUNNING.
        try:
            reconcile_failed_runs(study, settings.experiment_id)
        except Exception as exc:
            if not storage_unreachable(exc):
                raise  # unreachable: the next command's first pass ends it
    finally:
        claim.close()
