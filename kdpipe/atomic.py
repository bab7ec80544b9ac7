"""Writing files in one step: a reader, a concurrent worker or a resumed run never sees half a file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk (torch's writer gives no errno)


class DiskFull(OSError):
    """A write ran out of space: one line naming the file, the space left and the file system's mount point (measured
    before the partial file is removed, so the numbers are those the write met)."""

    def __init__(self, path: Path):
        mount = Path(path).parent.absolute()
        while not os.path.ismount(mount):
            mount = mount.parent
        free = shutil.disk_usage(mount).free
        super().__init__(errno.ENOSPC, f"disk full while writing {path} ({free / 1e6:.1f} MB left on {mount})")

    def __str__(self) -> str:
        return self.strerror


def _out_of_space(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC anywhere in the exception's chain, or (torch.save to a path,
    numpy: no errno) a write error on a file system with next to nothing left."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: Path, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` at once.

    `private`: readable by the owner only (0600), for files that hold credentials.

    The temporary file is created by mkstemp (O_CREAT | O_EXCL, a random name), so a name planted in a shared
    cache directory, a symlink included, is never opened or followed; workers writing the same entry do not
    collide, and a writer killed mid-way leaves the previous file whole. os.replace swaps the directory entry
    itself: a symlink at `path` is replaced, not written through. Running out of space raises DiskFull.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; cache entries are read by the user's other tools
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as OSError, or from torch.save as RuntimeError
        if isinstance(exc, DiskFull) or not _out_of_space(exc, path.parent):
            raise
        raise DiskFull(path) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def write_json(path: Path, obj: Any, private: bool = False) -> None:
    with atomic_write(path, private) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
