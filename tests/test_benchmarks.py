"""The benchmark scripts the README quotes still run and print what it shows (fast settings, not its numbers)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_deploy_candidates_prints_every_model_on_both_runtimes(tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDPIPE_CACHE_DIR", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deploy.py"), "--part", "candidates",
                           "--set", "teacher.train.epochs=8", "--set", "distill.epochs=12", "--set",
                           "export.qat_epochs=1", "--runs", "5", "--warmup", "1", "--budget-s", "0.2"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model   runtime"))
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[header + 1:header + 9]}
    assert set(rows) == {(m, r) for m in ("fp32", "static", "mixed", "qat") for r in ("onnxruntime", "openvino")}
    accuracy = {key: float(values[0]) for key, values in rows.items() if values[0] != "cannot"}
    # The outlier student: full static INT8 collapses, the budget's mixed model keeps within a point of FP32.
    assert accuracy["static", "onnxruntime"] < 30 and accuracy["fp32", "onnxruntime"] > 75
    assert accuracy["mixed", "onnxruntime"] >= accuracy["fp32", "onnxruntime"] - 1.0
    for key, values in rows.items():
        if values[0] != "cannot":  # OpenVINO's refusal of a graph is printed as a finding
            p50, p90, p99 = map(float, values[2:5])
            assert len(values) == 9 and 0 < p50 <= p90 <= p99, (key, values)  # then the agreement, or —
    assert next(line for line in lines if line.startswith("mixed: export.int8_budget 0.01")).count("→") == 1


def test_startup_prints_the_second_run_its_stages_and_the_import_floor(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KDPIPE_CACHE_DIR"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--repeats", "1",
                           "--set", "teacher.train.epochs=4", "--set", "distill.epochs=2", "--set",
                           "validate.gates.accuracy_min=0", "--set", "validate.gates.max_accuracy_drop_vs_teacher=1"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    row = lambda start: next(line.split() for line in lines if line.lstrip().startswith(start))  # noqa: E731
    second, unfrozen = float(row("second run")[6]), float(row("without kdpipe.gc_tuning")[2])
    stages, page, rest = float(row("stages")[1]), float(row("report.html")[1]), float(row("start-up and end")[3])
    assert second > 0 and unfrozen > 0
    assert stages + page + rest == pytest.approx(second, abs=0.15)  # the parts add up to the run
    assert [name for name in row("stages")[3::2]] == ["teacher", "distill", "export", "validate", "register"]
    floor = [float(line.split(" s ")[0].split()[-1]) for line in lines if line.lstrip().startswith("+ ")]
    assert len(floor) == 6 and floor[0] > 0.3  # six cumulative groups; torch alone is no instant import
