"""`kdpipe init` (the example files a package user starts from) and `kdpipe --version`."""

from __future__ import annotations

import platform
from importlib.metadata import version

from conftest import PIPELINES, ROOT, cli


def test_init_writes_the_default_pipeline_and_mlflow_yaml(workdir):
    (workdir / "mlflow.db").unlink()  # what a new user's folder holds: nothing
    result = cli("init")
    assert result.exit_code == 0, result.output
    # The installed copies are the repository's files (kdpipe/mlflow.yaml is a copy of ./mlflow.yaml).
    assert (workdir / "pipeline.yaml").read_text() == (PIPELINES / "digits.yaml").read_text()
    assert (workdir / "mlflow.yaml").read_text() == (ROOT / "mlflow.yaml").read_text()
    checked = cli("check", "pipeline.yaml")
    assert checked.exit_code == 0, checked.output


def test_init_refuses_to_overwrite_naming_the_file(workdir):
    (workdir / "mlflow.yaml").write_text("experiment: mine\n")
    result = cli("init")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("mlflow.yaml: exists")
    assert (workdir / "mlflow.yaml").read_text() == "experiment: mine\n"
    assert not (workdir / "pipeline.yaml").exists()  # nothing written when any file is in the way


def test_version_names_kdpipe_and_the_libraries_a_run_depends_on():
    result = cli("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"kdpipe {version('kdpipe')} (python {platform.python_version()}, torch {version('torch')}, "
        f"onnxruntime {version('onnxruntime')}, mlflow {version('mlflow')})")
