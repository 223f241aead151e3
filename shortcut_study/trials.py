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
import fcntl
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .server import normalize_db_url

# Optuna's retry callback is marked experimental, but it is Optuna's documented pattern.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_ATTR = "heartbeat_at"
# Trials that count toward `--n-trials`: a failed trial does not, so a study can be completed
# after a fix, and a killed one is retried.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class ClaimLock:
    """Serialises "count the trials, then start one" across every worker of a study: a file lock
    beside a SQLite database or journal file, a PostgreSQL advisory lock for a server (released by
    the server when a killed worker's connection drops)."""

    def __init__(self, storage_url: str, study: str) -> None:
        self._file: Path | None = None
        self._url = normalize_db_url(storage_url) if storage_url.startswith(("postgresql", "postgres:")) else None
        self._pg = None  # a connection of its own: the advisory lock lives as long as it does
        self._key = zlib.crc32(f"shortcut-study:{study}".encode())
        self._held = False
        if "://" not in storage_url:  # a journal file
            self._file = Path(f"{storage_url}.claim.lock")
        elif storage_url.startswith("sqlite:///"):
            self._file = Path(f"{storage_url.removeprefix('sqlite:///')}.claim.lock")
        elif self._url is None:
            raise ValueError(f"no claim lock for storage {storage_url!r}")
        self._fh = None

    def _advisory(self, sql: str) -> None:
        if self._pg is None:
            import sqlalchemy

            engine = sqlalchemy.create_engine(self._url, poolclass=sqlalchemy.pool.NullPool)
            self._pg = engine.raw_connection()
        try:
            with contextlib.closing(self._pg.cursor()) as cur:
                cur.execute(sql, (self._key,))
            self._pg.commit()
        except Exception:
            self.reset()
            raise

    def reset(self) -> None:
        """Drop the connection (the database went away); the next acquire reconnects."""
        self._held = False
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.invalidate() if hasattr(self._pg, "invalidate") else self._pg.close()
            self._pg = None

    def acquire(self) -> None:
        if self._held:
            return
        if self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._file, "a")
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        elif self._url is not None:
            self._advisory("SELECT pg_advisory_lock(%s)")
        self._held = True

    def release(self) -> None:
        """Idempotent: the objective releases as soon as its trial exists; the loop again after."""
        if not self._held:
            return
        self._held = False
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        elif self._url is not None:
            self._advisory("SELECT pg_advisory_unlock(%s)")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        self.reset()


def storage_unreachable(exc: BaseException) -> bool:
    """A database that went away (restart, network): wait and retry, rather than fail."""
    import sqlalchemy.exc

    if isinstance(exc, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError)):
        return True
    return type(exc).__module__.startswith("psycopg2") and type(exc).__name__ in ("OperationalError", "InterfaceError")


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
    parameters again (Optuna's retry pattern) when `retry`; call `on_failed` for each."""
    storage = study._storage  # noqa: SLF001
    now, failed = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - _last_sign_of_life(trial) <= grace:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):  # noqa: SLF001
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        frozen = storage.get_trial(trial._trial_id)  # noqa: SLF001
        failed.append(frozen)
        if retry:
            RetryHeartbeatStaleTrialCallback(max_retry=3)(study, frozen)
        if on_failed is not None:
            on_failed(frozen)
    return failed


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


def spawn_workers(argv: list[str], n: int) -> int:
    """Run `n` copies of the command `argv` (a `sweep` without --workers) side by side, each pinned
    to its share of the cores so their threads split the machine instead of oversubscribing it;
    return the worst exit code."""
    import subprocess
    import sys

    procs = []
    for share in core_shares(n):
        procs.append(subprocess.Popen([sys.executable, "-m", "shortcut_study.cli", *argv],
                                      preexec_fn=lambda share=share: os.sched_setaffinity(0, share)))
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
    return max(codes)
