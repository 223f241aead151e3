"""Where studies are stored, and the locks several processes share them with: storage URLs as
users type them, opening an Optuna storage (SQLite, PostgreSQL or a journal file), a host-local file
lock for one-time setup, and the claim lock that serialises "count, then start a trial" across the
workers of a study on every host.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from .errors import UserError, require_writable

# SQLAlchemy maps a bare postgresql:// to the psycopg (3) driver, which is not installed; the
# locked driver is psycopg2 (psycopg2-binary), chosen here for every PostgreSQL URL.
PG_DRIVER = "psycopg2"

def normalize_db_url(url: str) -> str:
    """`postgresql://…` (as users type it) -> `postgresql+psycopg2://…`; other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return f"postgresql+{PG_DRIVER}://" + url[len(prefix):]
    return url


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise one-time setup (schema migrations race) between processes on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# A server that accepts a connection and never answers must not hang a command: libpq gives up
# connecting after `connect_timeout` seconds, and a statement that runs longer than two minutes is
# cancelled (Optuna's statements take milliseconds). The claim lock's own connection waits for the
# lock as long as another worker holds it, so it sets only the connect timeout.
PG_CONNECT_ARGS = {"connect_timeout": 10, "options": "-c statement_timeout=120000"}
# Storages with a claim lock (ClaimLock): a file lock for SQLite, an advisory lock for PostgreSQL.
RDB_SCHEMES = ("sqlite", "postgresql")
# Under the working directory, as Optuna's and MLflow's own defaults are.
STUDIES = Path("studies")
DEFAULT_STORAGE = f"sqlite:///{STUDIES / 'optuna.db'}"
def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: any RDB URL (SQLite default) or a `.journal` file path."""
    url = normalize_db_url(url or DEFAULT_STORAGE)
    if url.endswith(".journal") and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        require_writable(url)
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise UserError(f"unknown storage URL {url!r}: use sqlite:///PATH.db, postgresql://USER@HOST/DB "
                        "or a PATH.journal file")
    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        require_writable(path)  # a parent that is a file, a read-only mount: named here, with the fix
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy writer, not "database is locked"
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": PG_CONNECT_ARGS}
    last: Exception | None = None
    for attempt in range(6):  # fresh workers on several hosts race to create the schema
        try:
            with file_lock(STUDIES / ".init.lock"):  # ... and on one host, serialised here
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except ImportError as exc:
            raise UserError(f"storage {url}: database driver missing ({exc.name}) — install it, e.g. "
                            "`uv add psycopg2-binary` for PostgreSQL") from None
        except Exception as exc:  # sqlalchemy OperationalError / IntegrityError / ArgumentError and friends
            last = exc
            if not any(word in str(exc) for word in ("UniqueViolation", "IntegrityError", "already exists")):
                break
            time.sleep(0.2 + random.random() * attempt)
    first = (str(last).strip().splitlines() or [type(last).__name__])[0]
    raise UserError(f"cannot reach storage {url}: {first[:200]} — start the database or fix --storage") from None


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

            engine = sqlalchemy.create_engine(self._url, poolclass=sqlalchemy.pool.NullPool,
                                              connect_args={"connect_timeout": PG_CONNECT_ARGS["connect_timeout"]})
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


