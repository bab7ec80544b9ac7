"""Optuna storages shared by workers: RDB URLs (sqlite, PostgreSQL), Optuna's journal file, and opening a study safely."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

from kdpipe.errors import InputError
from kdpipe.locks import file_lock

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
# Any fixed 64-bit key works: every kdpipe worker takes the same lock around schema and study creation.
SCHEMA_LOCK_KEY = 0x6B64706970650001


def is_rdb_url(storage: str) -> bool:
    return storage.split(":", 1)[0].split("+", 1)[0] in RDB_SCHEMES and "://" in storage


def sqlalchemy_url(storage: str) -> str:
    """psycopg (v3) is the PostgreSQL driver kdpipe supports; SQLAlchemy's plain postgresql:// means psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if storage.startswith(prefix):
            return "postgresql+psycopg://" + storage[len(prefix):]
    return storage


def mask_credentials(url: str) -> str:
    """`url` as it may be recorded (params, report, the run's pipeline copy): scheme://user:****@host/...

    A password with '@' must be percent-encoded in a URL anyway, so the userinfo ends at the last '@' before it.
    """
    return re.sub(r"^([A-Za-z][\w+.-]*://[^:@/?#]*):[^@]*@", r"\1:****@", url)


def describe_storage(storage: str) -> str:
    """The storage as the report may show it: an RDB URL without its password, a journal file's full path."""
    return mask_credentials(storage) if is_rdb_url(storage) else str(Path(storage).resolve())


def storage_file(storage: str) -> Path | None:
    """The file a storage writes (a sqlite database, Optuna's journal); None for a database server."""
    if not is_rdb_url(storage):
        return Path(storage).resolve()
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(url.database).resolve()
    return None


def check_storage_location(storage: str | None, overrides: list[str], cache_dir: Path) -> None:
    """A file storage named by the pipeline file must lie in the cache directory: a pipeline file alone cannot make
    a run write files anywhere else. One given on the command line (--storage, --set search.storage=) may go anywhere.
    Raises InputError (exit 2)."""
    if storage is None or any(o.partition("=")[0].strip() in ("search", "search.storage") for o in overrides):
        return
    path, cache = storage_file(storage), Path(cache_dir).resolve()
    if path is not None and not path.is_relative_to(cache):
        raise InputError("search.storage", f"a file storage named in the pipeline file must lie in the cache "
                                           f"directory {cache}, not {path}; give it with --storage or --set, or "
                                           "leave it null (a sqlite file in the run directory)")


@contextlib.contextmanager
def schema_lock(url: str):
    """Serialize schema and study creation across workers starting at the same instant.

    Two processes creating Optuna's tables on an empty PostgreSQL database at
    once collide on a duplicate enum type, so PostgreSQL workers take an
    advisory lock; sqlite workers on one machine take a file lock.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
        finally:
            engine.dispose()
    elif parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        with file_lock(Path(f"{parsed.database}.lock")):
            yield
    else:
        yield


def open_study(storage: str, study_name: str, directions: list[str], *, sampler=None, pruner=None,
               heartbeat_seconds: int = 30):
    """Create the study or join it; safe when many workers start together."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if is_rdb_url(storage):
            url = sqlalchemy_url(storage)
            try:
                with schema_lock(url):
                    backend = RDBStorage(url, heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
                    study = optuna.create_study(storage=backend, study_name=study_name, directions=directions,
                                                sampler=sampler, pruner=pruner, load_if_exists=True)
            except ImportError as exc:
                raise InputError("search.storage", f"no database driver for '{describe_storage(storage)}' ({exc}); "
                                                   "for PostgreSQL: pip install 'kdpipe[postgres]'") from None
        else:
            path = Path(storage)
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalStorage(JournalFileBackend(str(path)))
            study = optuna.create_study(storage=backend, study_name=study_name, directions=directions,
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise InputError("search.objective", f"study '{study_name}' exists with directions {found}, this objective "
                                             f"needs {directions}; pick another study name")
    return study
