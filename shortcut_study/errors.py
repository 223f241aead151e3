"""User-facing errors and atomic output writes.

A `UserError` carries a one-line message naming the bad thing and the fix; the CLI prints it
without a traceback. Every output file is written through `atomic_path` so an interrupted
command never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """Bad input or configuration: the message is shown to the user as it is."""


@contextlib.contextmanager
def interrupts_unwrapped() -> Iterator[None]:
    """Ctrl-C inside the block leaves it as a KeyboardInterrupt, also where Python wrapped it:
    3.11 re-raises an interrupt that lands in a class body's `__set_name__` (an import, say of
    torchvision) as a RuntimeError caused by it. Any other exception passes unchanged."""
    try:
        yield
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__
        if cause is not None:
            raise KeyboardInterrupt from exc
        raise


def disk_full(exc: BaseException) -> bool:
    """A write that failed because the disk is full: ENOSPC, or torch.save's RuntimeError from its
    zip writer ("unexpected pos" / "enforce fail"), which hides the errno."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and any(k in str(exc) for k in ("unexpected pos", "enforce fail",
                                                                            "No space left"))


def write_error(path: Path, exc: BaseException) -> UserError:
    """One line for a write that failed: the path, why, and the fix."""
    if disk_full(exc):
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        return UserError(f"cannot write {path}: the disk is full ({free // 1024} KiB free) — free some space and "
                         "run the command again")
    return UserError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds. A write
    that fails (a full disk included, whatever the writer raised) is one UserError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not disk_full(exc):
                raise
            raise write_error(path, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def read_json(path: str | Path, what: str, fix: str, kind: type = dict) -> object:
    """The one reader of every JSON file the tool reads back (a run's config, a cache index, an
    export's best_run.json, a benchmark's files): its content as `kind`, or one UserError naming the
    file and the fix for anything else — unreadable, not JSON, nested past Python's stack, another
    type."""
    path = Path(path)
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:100]
        raise UserError(f"cannot read {what} {path} ({reason}) — {fix}") from None
    if not isinstance(tree, kind):
        raise UserError(f"{path} is not a {what} (a JSON {type(tree).__name__}, not an object) — {fix}")
    return tree


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """Return `path` if it is an existing file, else raise a UserError naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} — {fix}")
    return path


def require_dir(path: str | Path, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} not found: {path} — {fix}")
    return path


def require_writable(path: str | Path, kind: str = "file") -> Path:
    """Check, before any work, that `path` can be written as a `kind` ("file" or "folder"): not
    an existing folder where a file goes (or the reverse), not under a file, on a writable mount."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise UserError(f"cannot write {path}: it is a folder — give a file path")
        if kind == "folder" and not path.is_dir():
            raise UserError(f"cannot write {path}: it is a file — give a folder path")
        target = path if kind == "folder" else path.parent
    else:
        target = path.parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise UserError(f"cannot write {path}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {target} is not writable (read-only or another owner)")
    return path
