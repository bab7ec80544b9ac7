"""Advisory file locks (fcntl.flock) between kdpipe processes on one machine."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Busy(Exception):
    """Another process holds the lock; `holder` is the process id it wrote, when readable."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by process {holder or 'unknown'}")
        self.holder = holder


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created when missing) for the block; the kernel drops it when the process
    dies, so a killed holder never leaves it stale. `wait=False` raises Busy instead of waiting.

    The file is opened read-only when it cannot be opened for writing (a read-only directory): flock needs no
    write access, and the holder's pid is then simply not recorded.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        writable = True
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
        writable = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(path, Path(path).read_text().strip()) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
