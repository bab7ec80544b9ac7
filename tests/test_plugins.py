"""A package outside kdpipe extends it through entry points: a method, a data source and an augmentation step.

The plugin is installed by pip from its pyproject.toml (as a user's package would be) into a folder of its own
that only this test's kdpipe processes see (PYTHONPATH), so the other tests, in this process or beside it, never
meet it. Its build backend is a few lines in its own tree (PEP 517 backend-path): the test then needs no build
tool beyond pip, whatever setuptools or wheel the environment has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import FAST, read_report, run_process, sets, write_pipeline

PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]

[project]
name = "kdpipe-tinyplugin"
version = "0.1"
"""

ENTRY_POINTS = """\
[kdpipe.methods]
logit_mse = kdpipe_tinyplugin:LogitMSE
kd = kdpipe_tinyplugin:LogitMSE

[kdpipe.sources]
tiny_digits = kdpipe_tinyplugin:TINY_DIGITS

[kdpipe.augment]
vflip = kdpipe_tinyplugin:VFLIP
"""

# A PEP 517 backend writing the wheel: the package, and its metadata with the entry points of entry_points.txt.
BACKEND = r"""
import base64, hashlib, zipfile
from pathlib import Path

DIST = "kdpipe_tinyplugin-0.1.dist-info"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {
        "kdpipe_tinyplugin/__init__.py": Path("kdpipe_tinyplugin/__init__.py").read_text(),
        f"{DIST}/METADATA": "Metadata-Version: 2.1\nName: kdpipe-tinyplugin\nVersion: 0.1\n",
        f"{DIST}/WHEEL": "Wheel-Version: 1.0\nGenerator: backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{DIST}/entry_points.txt": Path("entry_points.txt").read_text(),
    }
    name, record = "kdpipe_tinyplugin-0.1-py3-none-any.whl", []
    with zipfile.ZipFile(Path(wheel_directory) / name, "w") as wheel:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            wheel.writestr(path, data)
            record.append(f"{path},sha256={digest},{len(data)}")
        wheel.writestr(f"{DIST}/RECORD", "\n".join([*record, f"{DIST}/RECORD,,"]) + "\n")
    return name
"""

MODULE = '''
from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from kdpipe.config_base import PositiveInt, Strict
from kdpipe.config_data import ArrayData
from kdpipe.data.augment import AugmentKind
from kdpipe.data.sources import Part, Source, SourceKind
from kdpipe.methods import Method, Params, method, param


class LogitMSEParams(Params):
    weight: float = param(1.0, ge=0.0, low=0.1, high=10.0, log=True, description="multiplies the logit MSE")


@method("logit_mse")
class LogitMSE(Method):
    summary = "logit matching: CE + weight·mean (z_s − z_t)²"
    Params = LogitMSEParams

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        mse = F.mse_loss(student.logits, teacher.logits)
        return ce + self.params.weight * mse, {"ce": ce.detach(), "mse": mse.detach()}


class TinyDigits(ArrayData):
    source: Literal["tiny_digits"] = "tiny_digits"
    per_class: PositiveInt = Field(60, description="samples kept per class")


def read_tiny_digits(cfg):
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = [i for c in range(10) for i in (digits.target == c).nonzero()[0][:cfg.per_class]]
    return Source({"all": Part(digits.images[keep, None] / 16.0, digits.target[keep], "tiny digits")})


TINY_DIGITS = SourceKind(TinyDigits, read_tiny_digits)


class VFlip(Strict):
    p: float = Field(0.5, ge=0.0, le=1.0)


VFLIP = AugmentKind(VFlip, lambda params, size: __import__("kornia").augmentation.RandomVerticalFlip(p=params.p))
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the installed plugin (built by pip from its pyproject.toml), for PYTHONPATH."""
    source = tmp_path_factory.mktemp("plugin-source")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "backend.py").write_text(BACKEND)
    (source / "entry_points.txt").write_text(ENTRY_POINTS)
    (source / "kdpipe_tinyplugin").mkdir()
    (source / "kdpipe_tinyplugin" / "__init__.py").write_text(textwrap.dedent(MODULE))
    target = tmp_path_factory.mktemp("plugin-installed")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(target), str(source)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return target


def kdpipe(plugin_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_process(*args, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_path),
                                                                                os.environ.get("PYTHONPATH")]))})


def clash_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "'kd'" in line]


def test_methods_lists_the_plugins_method_and_refuses_a_clash_in_one_line(plugin_path):
    result = kdpipe(plugin_path, "methods")
    assert result.returncode == 0, result.stderr
    assert "logit_mse: logit matching: CE + weight·mean (z_s − z_t)² [plugin: kdpipe-tinyplugin 0.1]" in result.stdout
    assert "    weight = 1.0  search [0.1, 10.0] log  # multiplies the logit MSE" in result.stdout
    assert "kd: " in result.stdout and "kd: logit matching" not in result.stdout  # the built-in kd stays
    assert clash_lines(result.stderr) == [
        "kdpipe: warning: entry point 'kd' of kdpipe.methods (from kdpipe-tinyplugin 0.1) is not loaded: 'kd' is one "
        "of kdpipe's own; the plugin must use another name"]


def test_schema_holds_the_plugins_method_source_and_augmentation_step(plugin_path):
    result = kdpipe(plugin_path, "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["x-kdpipe-plugins"] == {"kdpipe.methods": {"logit_mse": "kdpipe-tinyplugin 0.1"},
                                          "kdpipe.sources": {"tiny_digits": "kdpipe-tinyplugin 0.1"},
                                          "kdpipe.augment": {"vflip": "kdpipe-tinyplugin 0.1"}}
    defs = schema["$defs"]
    assert defs["Distill_logit_mse"]["properties"]["method"]["const"] == "logit_mse"
    assert defs["LogitMSEParams"]["properties"]["weight"]["search"] == {"low": 0.1, "high": 10.0, "log": True}
    assert defs["TinyDigits"]["properties"]["per_class"]["default"] == 60
    assert "vflip" in defs["AugmentStep"]["properties"]


def test_a_pipeline_runs_with_the_plugins_method_source_and_augmentation(plugin_path, workdir):
    path = write_pipeline(workdir / "p.yaml", **{"data": {"source": "tiny_digits", "per_class": 80,
                                                          "augment": [{"vflip": {"p": 0.5}}]},
                                                 "distill.method": "logit_mse", "distill.params": {"weight": 0.5},
                                                 "export.quantize": "none", "export.deliver": "fp32"})
    try:
        # about which parts ran, not how well: two epochs each, no accuracy gates
        result = kdpipe(plugin_path, "run", path, *sets(*FAST, "teacher.train.epochs=2", "distill.epochs=2",
                                                        "validate.gates.accuracy_min=0.0",
                                                        "validate.gates.max_accuracy_drop_vs_teacher=1.0",
                                                        "validate.gates.above_chance=null"))
        assert result.returncode == 0, result.stderr
        report = read_report(result.stdout)
        assert report["method"] == {"name": "logit_mse", "params": {"weight": 0.5}}
        assert report["data"]["source"] == "tiny_digits" and report["data"]["train"] + report["data"]["val"] + \
            report["data"]["test"] == 800
        assert len(clash_lines(result.stderr)) == 1
    finally:  # the session's last check loads every run's record in this process, where the plugin is not installed
        shutil.rmtree(workdir / "runs", ignore_errors=True)


def test_without_the_plugin_its_names_are_unknown(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"distill.method": "logit_mse", "data.source": "tiny_digits"})
    result = run_process("check", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"{path}: data.source: unknown source 'tiny_digits'")
