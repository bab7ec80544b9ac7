"""pipelines/cifar100/: the published CIFAR-100 recipes are what scripts/cifar100_pipelines.py writes, every file
passes `kdpipe check` on a tiny archive in the CIFAR format, and one epoch runs end to end for every pair."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cifar_archive import write_cifar100
from conftest import PIPELINES, ROOT, cli, read_report, sets
from kdpipe.pipeline import load_pipeline

FILES = sorted((PIPELINES / "cifar100").glob("*.yaml"))
PAIRS = ["resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20", "vgg13-vgg8", "resnet32x4-shufflev2"]
# One epoch of each, with gates any trained model passes, on few and short latency measurements.
ONE_EPOCH = ["distill.epochs=1", "teacher.train.epochs=1", "distill.optimizer.milestones=[1]",
             "teacher.train.optimizer.milestones=[1]", "validate.gates={above_chance: null}",
             "validate.batch_sizes=[1]", "validate.runs=5", "validate.warmup=1", "validate.budget_s=0.1"]


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("cifar"))


def test_the_files_are_what_the_generator_writes():
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "cifar100_pipelines.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(FILES) == 99  # 5 pairs × 20 methods, less reviewkd vgg13→vgg8 (its weight is unconfirmed)


def test_the_documented_table_is_the_generators():
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "cifar100_pipelines.py"), "--table"],
                           capture_output=True, text=True, check=True).stdout
    assert table.count("\n") > 20 and table in (ROOT / "docs" / "how-to" / "port.md").read_text()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_recipe_is_a_valid_pipeline(path, tiny_cifar100):
    """The schema, the method's parameters and the keys across sections (milestones within the epochs)."""
    pipeline = load_pipeline(path, [f"data.path={tiny_cifar100}"])
    assert pipeline.data.source == "cifar" and pipeline.distill.optimizer.scheduler == "multistep"


@pytest.mark.slow  # builds both networks and runs the method's checks on them: seconds each on 2 cores
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_recipe_passes_check(path, tiny_cifar100):
    result = cli("check", path, *sets(f"data.path={tiny_cifar100}"))
    assert result.exit_code == 0, result.output
    assert "5 classes" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS)
def test_one_epoch_of_kd_runs_for_every_pair(workdir, tiny_cifar100, pair):
    """Teacher and student of each pair train an epoch; resnet56→resnet20 goes on through export, validate and
    register (the others stop after distill: exporting each pair's ONNX costs a minute on 2 cores)."""
    until = [] if pair == "resnet56-resnet20" else ["--until", "distill"]
    result = cli("run", PIPELINES / "cifar100" / f"{pair}-kd.yaml", "--runs-dir", workdir / "runs", *until,
                 *sets(f"data.path={tiny_cifar100}", *ONE_EPOCH))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["data"]["provenance"]["stored_dtype"] == "uint8"
    assert report["status"] == ("passed" if not until else report["status"]), report["status"]
