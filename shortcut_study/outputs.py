"""One way to replace an output folder: stage it whole, then swap it in.

The staging folder is made fresh (`tempfile.mkdtemp`: an unpredictable name, created by this process,
never an existing path followed) in the destination's parent, so the swap is a rename on one file
system. With a destination already there, the two are exchanged in one atomic
`renameat2(RENAME_EXCHANGE)` where the kernel has it (Linux 3.15 and later), so at every instant the
destination holds the complete old set or the complete new one; the old set is removed afterwards.
Elsewhere the old set is first renamed aside (an instant with no destination, never a mixture). If
the block fails or is interrupted, the staging folder is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError, disk_full, write_error

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the C library or the kernel cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (file system without it), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def replace_folder(dest: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds, it becomes `dest`."""
    dest = Path(dest)
    if dest.is_symlink():
        raise UserError(f"{dest} is a symbolic link: outputs are never written through one — remove it or give "
                        "another destination")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"cannot write {dest}: it is a file — give a folder path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        try:
            yield stage
        except (OSError, RuntimeError) as exc:
            if not disk_full(exc):
                raise
            raise write_error(dest, exc) from None  # a writer that does not name its file (a plot, a table)
        if not dest.exists():
            os.rename(stage, dest)
        elif _exchange(stage, dest):
            shutil.rmtree(stage)  # it now holds the old set
        else:
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.rename(dest, aside / dest.name)
            os.rename(stage, dest)
            shutil.rmtree(aside)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
