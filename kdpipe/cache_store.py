"""Verified cache entries: files in the shared cache directory that carry their SHA-256, checked on every load.

A cache entry that a disk fault, a killed copy or a hand edit corrupted would otherwise fail every later run
until someone deletes it. Each entry `X` is written atomically (kdpipe.atomic) with its digest in `X.sha256`,
written first, so a reader never finds a fresh entry without its digest. `lookup` returns False for an entry
that is absent, and also, after one warning line, for one whose bytes do not match: that entry is removed and
the caller rebuilds it with `store`.

    if not lookup(path, warn):
        store(path, lambda tmp: torch.save(state, tmp))
    state = torch.load(path)

Two workers rebuilding the same entry at once may leave one's digest beside the other's bytes; the next
reader then rebuilds once more, so the race costs time, never a wrong result.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdpipe.atomic import atomic_write
from kdpipe.errors import InputError
from kdpipe.fingerprint import sha256_file

Warn = Callable[[str], None]
CACHE_DIR_ENV = "KDPIPE_CACHE_DIR"


def check_cache_dir(given: Path | None, runs_dir: Path | None) -> None:
    """InputError (exit 2) naming the setting when the cache directory cannot be made or written: `given`, else
    $KDPIPE_CACHE_DIR, else RUNS_DIR/.cache (with no `runs_dir`, only a directory named). A run would otherwise fail
    in its first stage that caches. Nothing is made: a refused run leaves nothing behind."""
    named = os.environ.get(CACHE_DIR_ENV)
    if given is not None:
        path, key = Path(given), "cache_dir"
    elif named:
        path, key = Path(named), CACHE_DIR_ENV
    elif runs_dir is not None:
        path, key = Path(runs_dir) / ".cache", "--runs-dir"
    else:
        return
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))  # where mkdir would make the rest
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise InputError(key, f"cannot write to the cache directory {path}: {problem}")


def warn_stderr(line: str) -> None:
    """The warning of callers without a progress display (the teacher caches)."""
    print(line, file=sys.stderr)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def lookup(path: Path, warn: Warn) -> bool:
    """True when `path` exists and matches its recorded SHA-256. A mismatched entry, or one without a digest,
    is removed with a warning and False returned, so the caller rebuilds it."""
    if not path.is_file():
        return False
    try:
        recorded = _digest_path(path).read_text().strip()
    except OSError:
        recorded = None
    if recorded == sha256_file(path):
        return True
    why = "no recorded sha256" if recorded is None else "sha256 does not match"
    warn(f"warning: cache entry {path} is corrupt ({why}); removed, rebuilding it")
    path.unlink(missing_ok=True)
    return False


def store(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file; it becomes `path`, with its SHA-256 recorded beside it."""
    with atomic_write(path) as tmp:
        write(tmp)
        with atomic_write(_digest_path(path)) as digest_tmp:
            digest_tmp.write_text(sha256_file(tmp) + "\n")


def load_json(path: Path, warn: Warn) -> Any | None:
    """A verified JSON entry's value, or None when it is absent or was corrupt (then removed)."""
    if not lookup(path, warn):
        return None
    return json.loads(path.read_text())


def store_json(path: Path, value: Any) -> None:
    store(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))
