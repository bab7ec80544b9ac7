"""End to end: `kdpipe run` on the default pipeline, its report.json, and what lands in the MLflow store."""

from __future__ import annotations

import json
import os
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, run_process, sets, tracked_nothing

DIGITS = PIPELINES / "digits.yaml"



def client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def test_default_pipeline_end_to_end(workdir):
    result = cli("run", DIGITS, *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.output
    report_path = Path(result.stdout.strip().splitlines()[-1])
    assert report_path == workdir / "runs" / "digits" / report_path.parent.name / "report.json"
    report = read_report(result.stdout)
    run_dir = report_path.parent

    assert report["status"] == "passed"
    assert report["method"] == {"name": "kd", "params": {
        "logit_stand": False, "base_temperature": 2.0, "temperature": 4.0, "weights": "alpha", "alpha": 0.9,
        "ce_weight": 0.1, "kd_weight": 9.0}}
    for name in ("kdpipe", "torch", "onnxruntime", "mlflow"):  # what produced this result
        assert report["versions"][name] == installed_version(name)
    assert report["teacher"]["params"] >= 10 * report["student"]["params"]
    assert 0.5 < report["student"]["accuracy"] <= 1.0
    assert report["teacher"]["accuracy"] > 0.8
    # ONNX accuracy comes from onnxruntime; PyTorch's on the same split must agree
    assert abs(report["student"]["accuracy"] - report["student"]["accuracy_torch"]) < 1e-6
    assert report["onnx"]["opset"] == 18
    assert report["onnx"]["parity_max_abs_diff"] <= 1e-4
    assert set(report["onnx"]["parity_by_batch_size"]) == {"1", "2", "7", "64", str(report["data"]["val"])}
    for batch_size in ("1", "64"):
        lat = report["latency_ms"][batch_size]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert lat["throughput"] > 0 and lat["runs"] == 50
    assert set(report["stage_seconds"]) == {"teacher", "distill", "export", "validate", "register"}
    assert all(g["passed"] for g in report["gates"].values())
    assert set(report["gates"]) >= {"parity_atol", "accuracy_min", "max_accuracy_drop_vs_teacher"}
    for name in ("pipeline.yaml", "student.onnx", "student.pt", "teacher.pt", "ledger.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "ledger.json").read_text())["finished"][-1] == "register"
    assert (run_dir / "ledger.json").stat().st_mode & 0o777 == 0o600  # it may hold a storage password
    assert not tracked_nothing(workdir)  # the check the refused runs use can see a run

    # The ONNX file on disk reproduces the reported accuracy with a dynamic batch dimension.
    sess = ort.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"

    mlflow_info = report["mlflow"]
    run = client().get_run(mlflow_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.params.temperature"] == "4.0"
    assert run.data.params["teacher.model.arch"] == "cnn"
    assert run.data.tags["kdpipe.status"] == "passed"
    history = client().get_metric_history(run.info.run_id, "student/val_accuracy")
    assert [m.step for m in history] == list(range(1, 7))
    assert len(client().get_metric_history(run.info.run_id, "teacher/train_loss")) in (0, 8)  # 0 when cached
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert {"report.json", "pipeline.yaml"} <= artifacts
    version = client().get_model_version_by_alias("digits-student", "champion")
    assert str(version.version) == mlflow_info["model_version"] and mlflow_info["alias"] == "champion"
    assert version.run_id == run.info.run_id


def test_scratch_baseline_and_teacher_cache(workdir):
    first = cli("run", DIGITS, *sets(*FAST, *LENIENT, "teacher.train.epochs=9", "distill.method=none", "distill.params={}"))
    assert first.exit_code == 0, first.output
    report = read_report(first.stdout)
    assert report["method"] == {"name": "none", "params": {}}
    assert report["teacher"]["source"] == "trained"
    assert report["status"] == "passed" and report["student"]["accuracy"] > 0.5

    second = cli("run", DIGITS, *sets(*FAST, *LENIENT, "teacher.train.epochs=9"))
    assert second.exit_code == 0, second.output
    cached = read_report(second.stdout)
    assert cached["teacher"]["source"].startswith("cache ")
    assert cached["teacher"]["accuracy"] == report["teacher"]["accuracy"]
    assert cached["stage_seconds"]["teacher"] < 0.25 * report["stage_seconds"]["teacher"]
    assert "teacher loaded from cache" in second.stderr


def test_gate_failure_exits_1_without_alias(workdir):
    result = cli("run", DIGITS, *sets(*FAST, "validate.gates.accuracy_min=0.9999", "validate.gates.latency_p50_ms_max=1e-6"))
    assert result.exit_code == 1, result.output
    report = read_report(result.stdout)
    assert report["status"] == "failed"
    assert not report["gates"]["accuracy_min"]["passed"]
    assert not report["gates"]["latency_p50_ms_max:bs1"]["passed"]
    assert report["mlflow"]["alias"] is None
    failed_line = next(line for line in result.stderr.splitlines() if line.startswith("gate failed: "))
    assert {"accuracy_min", "latency_p50_ms_max:bs1"} <= set(failed_line.removeprefix("gate failed: ").split(", "))
    assert client().get_run(report["mlflow"]["run_id"]).info.status == "FAILED"
    assert client().search_registered_models() == []  # a failing model is not registered


def test_stage_failure_exits_3_and_ends_the_mlflow_run_failed(workdir):
    proc = run_process("run", DIGITS, *sets(*FAST, "distill.optimizer.lr=1e30", "distill.optimizer.momentum=0"))
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'distill' failed: FloatingPointError"), last
    assert "Traceback" not in proc.stderr
    (report_path,) = (workdir / "runs" / "digits").glob("*/report.json")
    report = json.loads(report_path.read_text())
    assert report["status"] == "failed" and "distill" in report["error"]
    assert client().get_run(report["mlflow"]["run_id"]).info.status == "FAILED"


def test_schema_and_methods_commands():
    schema = json.loads(cli("schema").stdout)
    assert schema["additionalProperties"] is False
    assert {"data", "teacher", "student", "distill", "export", "validate", "register"} <= set(schema["properties"])
    listing = cli("methods").stdout
    assert "kd: Hinton KD" in listing and "temperature = 4.0  search [1.0, 20.0] log" in listing
    assert ("    family: logit; paper: Hinton, Vinyals and Dean, Distilling the Knowledge in a Neural Network; "
            "year: 2015") in listing
    assert "    family: baseline\n" in listing  # `none`: no paper
    from kdpipe.methods import FAMILIES, registry

    for name, cls in registry().items():
        assert cls.family in FAMILIES, name
        assert (cls.paper and cls.year) or cls.family == "baseline", f"{name} names no paper or year"
        assert cls.year is None or str(cls.year) not in cls.paper, f"{name}: the year is said in 'year' alone"


@pytest.mark.slow
def test_default_pipeline_meets_its_targets(workdir):
    """Acceptance 1 of the foundation: the full default pipeline, as the README runs it."""
    proc = run_process("run", DIGITS, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    report = read_report(proc.stdout)
    assert report["status"] == "passed"
    assert report["teacher"]["accuracy"] >= 0.97
    assert report["student"]["accuracy"] >= 0.93
    assert report["student"]["params"] * 10 <= report["teacher"]["params"]
    assert report["onnx"]["parity_max_abs_diff"] <= 1e-4
    assert report["mlflow"]["alias"] == "champion"
    sess = ort.InferenceSession(report["onnx"]["path"] if os.path.isabs(report["onnx"]["path"])
                                else str(workdir / report["onnx"]["path"]), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {"input": np.zeros((3, 1, 8, 8), np.float32)})[0]).all()


def test_a_run_leaves_the_callers_mlflow_environment_as_it_was(workdir, monkeypatch):
    """mlflow.set_tracking_uri/set_registry_uri/set_experiment write environment variables and module state; a run
    must not leave them behind: the caller's own next MLflow run lands where it would have without kdpipe."""
    import mlflow

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    before = os.environ["MLFLOW_TRACKING_URI"]
    result = cli("run", DIGITS, *sets(*FAST, *LENIENT, "export.quantize=none", "export.deliver=fp32"))
    assert result.exit_code == 0, result.output
    assert os.environ["MLFLOW_TRACKING_URI"] == before
    assert "MLFLOW_REGISTRY_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    with mlflow.start_run() as mine:
        assert mine.info.experiment_id == "0"  # MLflow's Default, not the pipeline's experiment
