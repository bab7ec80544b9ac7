"""The documentation's CI recipe (docs/tutorials/ci.md, "kdpipe in a CI job"): the GitHub Actions and GitLab CI jobs' own commands (all but the
installs), run as their CI would run them, on the default pipeline made fast: the exit code gates the job, the cache
directory they keep is the one kdpipe fills, and the artifact paths find the report, the gates table and the
models."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, write_pipeline

RECIPE_PAGE = ROOT / "docs" / "tutorials" / "ci.md"
FAST_FILE = {"teacher.train.epochs": 8, "distill.epochs": 6, "validate.runs": 20, "validate.warmup": 2,
             "validate.gates.accuracy_min": 0.5, "validate.gates.max_accuracy_drop_vs_teacher": 0.5}

pytestmark = pytest.mark.slow  # two fresh `kdpipe` processes, as a CI job starts them


def recipe(name: str) -> dict:
    """The YAML block that follows `<!-- ci-recipe: NAME -->` in the CI tutorial."""
    text = RECIPE_PAGE.read_text()
    match = re.search(rf"<!-- ci-recipe: {name} -->\n```yaml\n(.*?)```", text, re.S)
    assert match, f"{RECIPE_PAGE} has no ci-recipe block '{name}'"
    return yaml.safe_load(match.group(1))


def shell(command: str, cwd: Path, env: dict[str, str]) -> int:
    """`command` as a CI runner runs it: bash, stopping at the first failing command."""
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env).returncode


def job_environment(workdir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}
    env.pop("KDPIPE_CACHE_DIR", None)  # the job keeps runs/.cache, kdpipe's default
    return env


def artifacts(workdir: Path, patterns: list[str]) -> dict[str, list[str]]:
    return {p: sorted(glob.glob(p, root_dir=workdir)) for p in patterns}


def is_install(command: str) -> bool:
    return command.startswith("pip install")


def test_the_github_job_passes_fills_the_cache_and_summarizes_the_gates(workdir):
    steps = recipe("github")["jobs"]["distill"]["steps"]
    [cache] = [s for s in steps if s.get("uses", "").startswith("actions/cache")]
    [upload] = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    runs = [s for s in steps if "run" in s and not all(is_install(c) for c in s["run"].strip().splitlines())]
    assert [s.get("if") for s in runs] == [None, "always()"]  # the gates reach the summary whatever the exit code
    write_pipeline(workdir / "pipeline.yaml", **FAST_FILE)
    summary = workdir / "summary.md"
    env = job_environment(workdir, GITHUB_STEP_SUMMARY=str(summary))

    assert [shell(s["run"], workdir, env) for s in runs] == [0, 0]
    table = summary.read_text()
    assert table.startswith("## kdpipe digits: passed\n") and "| accuracy_min |" in table and "FAILED" not in table
    found = artifacts(workdir, upload["with"]["path"].split())
    [report] = found["runs/*/*/report.json"]
    assert found["runs/*/*/gates.md"] == [str(Path(report).parent / "gates.md")]
    assert {Path(p).name for p in found["runs/*/*/*.onnx"]} == {"student.onnx", "student.int8.onnx", "teacher.onnx"}
    assert (workdir / cache["with"]["path"] / "teachers").is_dir()  # what the next job restores
    run_id = json.loads((workdir / report).read_text())["mlflow"]["run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the job's store (another test may set MLflow's global)
    assert "gates.md" in {a.path for a in client.list_artifacts(run_id)}


def test_the_gitlab_job_fails_on_a_gate_with_the_cache_restored_and_keeps_its_artifacts(workdir, tmp_path_factory):
    job = recipe("gitlab")["distill"]
    assert job["artifacts"]["when"] == "always" and job["cache"]["paths"] == ["runs/.cache/"]
    # A previous job's cache, restored where the job keeps it: its teacher is loaded, not trained.
    previous = tmp_path_factory.mktemp("previous-job")
    write_pipeline(previous / "pipeline.yaml", **FAST_FILE)
    env = job_environment(workdir)
    assert shell("kdpipe run pipeline.yaml > /dev/null", previous, env) == 0
    shutil.copytree(previous / "runs" / ".cache", workdir / "runs" / ".cache")
    write_pipeline(workdir / "pipeline.yaml", **{**FAST_FILE, "validate.gates.accuracy_min": 1.0})

    script = "\n".join(c for c in job["script"] if not is_install(c))
    out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 1, out.stderr  # a gate failed: the job fails
    assert "teacher loaded from cache" in out.stderr and "gate failed: accuracy_min" in out.stderr
    after = subprocess.run(["bash", "-c", "\n".join(job["after_script"])], cwd=workdir, env=env,
                           capture_output=True, text=True)
    assert after.returncode == 0 and after.stdout.startswith("## kdpipe digits: failed\n")
    assert "| accuracy_min | " in after.stdout and "| 1 | **FAILED** |" in after.stdout
    found = artifacts(workdir, job["artifacts"]["paths"])
    assert all(len(found[p]) == (3 if p.endswith(".onnx") else 1) for p in found), found
