"""The built package stands alone: `python -m build` makes a wheel and an sdist, and the wheel, installed into a fresh
virtual environment outside the repository, runs `kdpipe init` and `kdpipe run` from the files it carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import FAST, LENIENT, ROOT, sets

pytestmark = pytest.mark.slow  # two builds, a venv and a run from scratch: about a minute


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], check=True, capture_output=True)
    (wheel,) = dist.glob("kdpipe-*.whl")  # built from the sdist, so the sdist holds everything too
    assert list(dist.glob("kdpipe-*.tar.gz"))
    assert {"kdpipe/stages/export.py", "kdpipe/pipelines/digits.yaml", "kdpipe/mlflow.yaml"} <= set(
        zipfile.ZipFile(wheel).namelist())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch, mlflow & co. from this test environment rather than a second download: its site-packages as plain path
    # lines, whose own .pth files (the checkout's editable kdpipe) are not run. The test venv may live inside the
    # checkout (.venv), so only the checkout itself is left out.
    Path(site, "test-deps.pth").write_text("".join(f"{p}\n" for p in sys.path
                                                   if p.endswith("site-packages") and Path(p) != ROOT))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "KDPIPE_CACHE_DIR", "PYTHONPATH")}
    kdpipe = str(venv / "bin" / "kdpipe")

    def run(*args):
        return subprocess.run([kdpipe, *args], capture_output=True, text=True, cwd=work,
                              env={**env, "OMP_NUM_THREADS": "1"})

    shown = run("--version")
    assert shown.returncode == 0 and shown.stdout.startswith(f"kdpipe {version('kdpipe')} ("), shown.stderr
    assert run("init").returncode == 0
    result = run("run", "pipeline.yaml", *sets(*FAST, *LENIENT))
    assert result.returncode == 0, result.stderr
    report = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())
    assert report["status"] == "passed"
    assert report["versions"]["kdpipe"] == version("kdpipe")
    assert report["versions"]["torch"] == version("torch")
    assert (work / "mlflow.db").exists()  # the store named in the mlflow.yaml that init wrote
    where = subprocess.run([python, "-c", "import kdpipe.stages; print(kdpipe.stages.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env).stdout
    assert where.startswith(site)  # the installed wheel ran, not the checkout
