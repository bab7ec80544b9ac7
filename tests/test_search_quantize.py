"""export.quantize and export.qat_epochs in a search space: a trial that draws an INT8 quantization is scored on
the INT8 model it ships (onnxruntime on the validation split), the best trial's quantization goes to export and
validate, and spaces that cannot work are refused (exit 2, one line naming the key)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from conftest import FAST, PIPELINES, cli, read_report, sets

SEARCH = PIPELINES / "digits-search.yaml"
# Two epochs train a student that is far from its teacher: gates loose enough for it (these tests are not about accuracy).
LOOSE = ["validate.gates.accuracy_min=0.1", "validate.gates.max_accuracy_drop_vs_teacher=0.9"]
QUICK = [*FAST, *LOOSE, "distill.epochs=2", "search.sampler=random", "search.pruner=none"]
QAT_OR_NONE = "search.space={export.quantize: {choices: [none, qat]}, export.qat_epochs: {choices: [1]}}"


def test_campaign_scores_each_trial_on_the_model_its_quantization_ships(workdir):
    # Seed 1 draws qat for two of the three trials and none for one. A Pareto search: latency is scored too.
    result = cli("run", SEARCH, *sets(*QUICK, QAT_OR_NONE, "search.trials=3", "search.seed=1",
                                      "search.objective=[val_accuracy, latency_p50]"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    found = report["search"]
    assert found["n_complete"] == 3

    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    parent = client.get_run(report["mlflow"]["run_id"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_quantization = {}
    for run in runs:
        by_quantization.setdefault(run.data.tags["kdpipe.quantization"], []).append(run)
        assert run.data.params["export.quantize"] == run.data.tags["kdpipe.quantization"]
    assert set(by_quantization) == {"none", "qat"}

    study = optuna.load_study(study_name=found["study"], storage=f"sqlite:///{Path(report['run_dir']) / 'search.db'}")
    values = {str(t.number): t.values for t in study.trials}
    for run in by_quantization["qat"]:
        metrics = run.data.metrics
        assert run.data.params["export.qat_epochs"] == "1"
        # The QAT phase ran one epoch in the trial, and the objective is the QDQ model's onnxruntime accuracy,
        # measured beside the FP32 student's (logged only on the INT8 path).
        history = client.get_metric_history(run.info.run_id, "qat/val_accuracy")
        assert len(history) == 1
        assert {"final/val_accuracy", "final/val_accuracy_fp32"} <= set(metrics)
        assert values[run.data.tags["optuna.trial"]] == pytest.approx([metrics["final/val_accuracy"],
                                                                       metrics["final/latency_p50"]])
    for run in by_quantization["none"]:
        assert "final/val_accuracy_fp32" not in run.data.metrics and "final/latency_p50" in run.data.metrics
        assert "export.qat_epochs" not in run.data.params  # conditional: drawn only with qat

    # The best trial's quantization is what export built and validate delivered.
    chosen = found["best_params"]["export.quantize"]
    resolved = yaml.safe_load((Path(report["run_dir"]) / "pipeline.yaml").read_text())
    assert resolved["export"]["quantize"] == chosen
    if chosen == "qat":
        assert report["quantization"]["mode"] == "qat" and report["quantization"]["qat"]["epochs"] == 1
        assert resolved["export"]["deliver"] == "int8" and report["quantization"]["delivered"] == "qat"
    else:
        assert "quantization" not in report and resolved["export"]["deliver"] == "fp32"


def test_qat_in_the_space_with_a_method_qat_cannot_fine_tune_exits_2(workdir):
    space = "search.space={method: {choices: [kd, at]}, at: {weight: auto}, export.quantize: {choices: [none, qat]}}"
    result = cli("run", SEARCH, *sets(*QUICK, space, "search.trials=2"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{SEARCH}: search.space.export.quantize: qat with method 'at': "), lines[-1]
    assert "taps student features" in lines[-1] and "Traceback" not in result.output
    [report] = [json.loads(path.read_text()) for path in (workdir / "runs").rglob("report.json")]
    assert (report["status"], report["failed_stage"]) == ("failed", "search") and "n_trials" not in report.get("search", {})


@pytest.mark.parametrize("space, key, message", [
    ("{export.qat_epochs: {low: 1, high: 3}}", "search.space.export.qat_epochs", "acts only with export.quantize qat"),
    ("{export.opset: {choices: [13, 18]}}", "search.space.export.opset", "the search sets export.quantize"),
    ("{export.quantize: {choices: [none, int4]}}", "search.space.export.quantize", "'int4' is not a valid quantize"),
])
def test_bad_export_space_is_an_input_error(workdir, space, key, message):
    result = cli("check", SEARCH, "--set", f"search.space={space}")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{SEARCH}: {key}: ") and message in lines[0], lines
