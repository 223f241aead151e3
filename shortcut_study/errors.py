"""User-facing errors and atomic output writes.

A `UserError` carries a one-line message naming the bad thing and the fix; the CLI prints it
without a traceback. Every output file is written through `atomic_path` so an interrupted
command never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """Bad input or configuration: the message is shown to the user as it is."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


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
