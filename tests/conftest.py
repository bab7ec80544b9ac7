"""Shared fixtures: every test runs in its own directory with its own MLflow store; teachers are cached per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"

# Settings that keep an end-to-end run to a few seconds on a 2-core machine.
FAST = ["teacher.train.epochs=8", "distill.epochs=6", "validate.runs=50", "validate.warmup=2"]
# Gates a FAST student meets, for tests about something other than accuracy.
LENIENT = ["validate.gates.accuracy_min=0.5", "validate.gates.max_accuracy_drop_vs_teacher=0.5"]


def sets(*overrides: str) -> list[str]:
    """`--set` arguments for each override."""
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="session")
def digits():
    from kdpipe.config import DataConfig
    from kdpipe.data import load_data

    return load_data(DataConfig(), 0)


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture
def workdir(tmp_path, monkeypatch, teacher_cache) -> Path:
    """A fresh working directory with its own sqlite MLflow store and the session's teacher cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(teacher_cache))
    return tmp_path


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


def run_process(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m kdpipe ...` as a real process."""
    return subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def read_report(stdout: str) -> dict:
    """The report that `kdpipe run` names on its last stdout line."""
    return json.loads(Path(stdout.strip().splitlines()[-1]).read_text())
