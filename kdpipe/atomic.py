"""Writing files in one step: a reader, a concurrent worker or a resumed run never sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


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
    itself: a symlink at `path` is replaced, not written through.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; cache entries are read by the user's other tools
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def write_json(path: Path, obj: Any, private: bool = False) -> None:
    with atomic_write(path, private) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
