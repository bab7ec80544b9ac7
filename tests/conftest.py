"""Shared fixtures: every test runs in its own directory with its own MLflow store; teachers are cached per session."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import forkserver
from forkserver import ForkServer

# pytest-xdist runs one worker per core: a worker's torch (and every process it starts) uses one thread, since
# threads beyond the cores spin against the other worker's (19% slower in-process tests on 2 cores, measured).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"

# Settings that keep an end-to-end run to a few seconds on a 2-core machine.
FAST = ["teacher.train.epochs=8", "distill.epochs=6", "validate.runs=50", "validate.warmup=2"]
# Gates a FAST student meets, for tests about something other than accuracy.
LENIENT = ["validate.gates.accuracy_min=0.5", "validate.gates.max_accuracy_drop_vs_teacher=0.5"]
# For runs in their own process: what torchrun sets too; threads only contend on a shared 2-core machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def sets(*overrides: str) -> list[str]:
    """`--set` arguments for each override."""
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="session")
def digits():
    from kdpipe.data.sources import data_config
    from kdpipe.data import load_data

    return load_data(data_config(), 0)


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(scope="session", autouse=True)
def every_run_record_passes_check(tmp_path_factory):
    """After this worker's tests: the record (pipeline.yaml) of every run directory they made under pytest's
    basetemp passes what `kdpipe check` checks, as `--resume` reads it. A test that changes a run's inputs on
    purpose after the run (its data, a checkpoint) must undo that change, or its record is reported here."""
    yield
    from kdpipe.errors import InputError
    from kdpipe.runner import prepare

    failures = []
    for ledger in sorted(tmp_path_factory.getbasetemp().rglob("ledger.json")):
        record = ledger.parent / "pipeline.yaml"
        try:
            prepare(record, [])
        except InputError as exc:
            failures.append(exc.format(str(record)))
        except Exception as exc:  # noqa: BLE001 - `kdpipe check` reports these too (exit 3)
            failures.append(f"{record}: {type(exc).__name__}: {exc}")
    assert not failures, "run records that do not pass `kdpipe check`:\n" + "\n".join(failures)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store with MLflow's schema migrations applied (seconds per store): copied per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def enter_workdir(patch: pytest.MonkeyPatch, path: Path, teacher_cache: Path, store_template: Path) -> Path:
    """Make `path` the working directory (undone with `patch`), with its own sqlite MLflow store (a copy of the
    migrated template) and the session's teacher cache."""
    shutil.copyfile(store_template, path / "mlflow.db")
    patch.chdir(path)
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
    patch.setenv("KDPIPE_CACHE_DIR", str(teacher_cache))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, teacher_cache, mlflow_store_template) -> Path:
    """A fresh working directory (enter_workdir) for one test."""
    return enter_workdir(monkeypatch, tmp_path, teacher_cache, mlflow_store_template)


def tracked_nothing(workdir: Path) -> bool:
    """Whether nothing was tracked in `workdir`'s MLflow store: none there, or as the template left it (no
    experiment but MLflow's Default, no run)."""
    if not (workdir / "mlflow.db").exists():
        return True
    with contextlib.closing(sqlite3.connect(f"file:{workdir / 'mlflow.db'}?mode=ro", uri=True)) as conn:
        experiments = conn.execute("SELECT name FROM experiments").fetchall()
        runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    return experiments == [("Default",)] and runs == 0


def write_pipeline(path: Path, base: Path = PIPELINES / "digits.yaml", **changes) -> Path:
    """`base` (pipelines/digits.yaml) with dotted-key changes applied (None deletes the key), written to `path`."""
    import yaml

    raw = yaml.safe_load(base.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*args: str):
    """Run the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from kdpipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


_fork_server: ForkServer | None = None


def fork_server(env: dict[str, str]) -> ForkServer | None:
    """This test process's fork server (tests/forkserver.py), started on first use; None where `env` changes how
    Python imports (a fresh interpreter must run it)."""
    global _fork_server
    if _fork_server is None:
        _fork_server = ForkServer(Path(tempfile.mkdtemp(prefix="kdpipe-fork-")))
        atexit.register(_fork_server.close)
    return _fork_server if _fork_server.accepts(env) else None


def process_environment(*changes: dict | None) -> dict[str, str]:
    """os.environ with `changes` applied in order; a value of None unsets its variable."""
    merged = {**os.environ}
    for change in changes:
        merged.update(change or {})
    return {k: v for k, v in merged.items() if v is not None}


def run_process(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m kdpipe ...` as a real process (forked from the fork server where it can be); `env` changes
    the environment (None unsets a variable)."""
    env = process_environment(env)
    if (server := fork_server(env)) is not None:
        return forkserver.run(server, args, env, cwd)
    return subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def start_run(*args: str, env: dict | None = None, cwd: Path | None = None, **popen):
    """`python -m kdpipe ARGS` as a real process on one thread, stdout and stderr on text pipes the test reads:
    forked (Popen's interface) unless other Popen arguments (`popen`) ask for a fresh one."""
    env = process_environment(ONE_THREAD, env)
    if not popen and (server := fork_server(env)) is not None:
        return forkserver.start(server, args, env, cwd)
    return subprocess.Popen([sys.executable, "-m", "kdpipe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, **popen)


def read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """stderr lines up to and including the first one containing `marker`."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"'{marker}' never appeared:\n{''.join(seen)}")


def read_report(stdout: str) -> dict:
    """The report that `kdpipe run` names on its last stdout line."""
    return json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
