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
from kdpipe.pipeline import load_pipeline
from kdpipe.search.space import resolve_space
from test_images import image_data  # noqa: F401 - the session's image folders, a fixture

SEARCH = PIPELINES / "digits-search.yaml"
# Two epochs train a student that is far from its teacher: gates loose enough for it (these tests are not about accuracy).
LOOSE = ["validate.gates.accuracy_min=0.1", "validate.gates.max_accuracy_drop_vs_teacher=0.9"]
QUICK = [*FAST, *LOOSE, "distill.epochs=2", "search.sampler=random", "search.pruner=none"]
QUANTIZE = "search.space={export.quantize: {choices: [none, static, qat]}, export.qat_epochs: {choices: [1]}}"


def test_campaign_scores_each_trial_on_the_model_its_quantization_ships(workdir):
    # Seed 1 draws static, none and qat in turn. A Pareto search: latency is scored too.
    result = cli("run", SEARCH, *sets(*QUICK, QUANTIZE, "search.trials=3", "search.seed=1",
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
    assert {q: len(r) for q, r in by_quantization.items()} == {"none": 1, "static": 1, "qat": 1}

    study = optuna.load_study(study_name=found["study"], storage=f"sqlite:///{Path(report['run_dir']) / 'search.db'}")
    values = {str(t.number): t.values for t in study.trials}
    for quantization, [run] in by_quantization.items():
        metrics = run.data.metrics
        # The objective: the shipped model's onnxruntime accuracy and latency; an INT8 model's is measured beside
        # the FP32 student's (logged only on the INT8 path).
        assert values[run.data.tags["optuna.trial"]] == pytest.approx([metrics["final/val_accuracy"],
                                                                       metrics["final/latency_p50"]])
        assert ("final/val_accuracy_fp32" in metrics) == (quantization != "none")
        # The QAT phase ran one epoch in the qat trial only; qat_epochs is drawn only with qat.
        assert len(client.get_metric_history(run.info.run_id, "qat/val_accuracy")) == (quantization == "qat")
        assert run.data.params.get("export.qat_epochs") == ("1" if quantization == "qat" else None)

    # The best trial's quantization is what export built and validate delivered.
    chosen = found["best_params"]["export.quantize"]
    assert chosen == max(found["pareto_front"], key=lambda t: t["values"]["val_accuracy"])["params"]["export.quantize"]
    resolved = yaml.safe_load((Path(report["run_dir"]) / "pipeline.yaml").read_text())
    assert resolved["export"]["quantize"] == chosen
    assert report.get("quantization", {}).get("mode", "none") == chosen
    assert resolved["export"]["deliver"] == ("fp32" if chosen == "none" else "int8")  # what the trial scored ships
    if chosen == "qat":
        assert report["quantization"]["qat"]["epochs"] == 1 and report["quantization"]["delivered"] == "qat"


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
    ("{export.calibration_method: auto}", "search.space.export.calibration_method",
     "acts only with export.quantize static or qat"),
    ("{export.quantize: {choices: [none, dynamic]}, export.calibration_method: auto}",
     "search.space.export.calibration_method", "acts only with export.quantize static or qat"),
    ("{export.quantize: {choices: [static]}, export.calibration_percentile: auto}",
     "search.space.export.calibration_percentile", "acts only with export.calibration_method percentile"),
    ("{export.opset: auto}", "search.space.export.opset", "the search sets export.quantize, export.qat_epochs, "
                                                          "export.calibration_method, export.calibration_percentile"),
])
def test_bad_export_space_is_an_input_error(workdir, space, key, message):
    result = cli("check", SEARCH, "--set", f"search.space={space}")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{SEARCH}: {key}: ") and message in lines[0], lines


def test_export_settings_declare_their_ranges_and_a_search_draws_each_only_where_it_acts():
    """export.quantize, qat_epochs and the calibration settings declare their default ranges (`auto`) and when they
    act, as a method's parameters do; calibration_percentile is drawn only in trials that draw percentile
    calibration, though the space names it first."""
    pipeline = load_pipeline(SEARCH, ["export.quantize=static", "search.space={export.calibration_percentile: auto, "
                                                                "export.calibration_method: auto}"])
    space = resolve_space(pipeline)
    assert space.export == {"calibration_percentile": {"low": 99.9, "high": 99.9999, "log": False},
                            "calibration_method": {"choices": ["minmax", "percentile"]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(16):
        trial = study.ask()
        drawn.append(space.suggest(trial).export)
        study.tell(trial, 0.0)
    assert {d["calibration_method"] for d in drawn} == {"minmax", "percentile"}
    for export in drawn:
        assert ("calibration_percentile" in export) == (export["calibration_method"] == "percentile"), export
        assert 99.9 <= export.get("calibration_percentile", 99.9) <= 99.9999
    quantize = resolve_space(load_pipeline(SEARCH, ["search.space={export.quantize: auto}"])).export
    assert quantize == {"quantize": {"choices": ["none", "dynamic", "static", "qat"]}}


def test_a_searched_calibration_is_what_each_trial_records_and_the_best_ships(workdir):
    space = "search.space={export.calibration_method: {choices: [minmax, percentile]}}"
    result = cli("run", SEARCH, *sets(*QUICK, space, "export.quantize=static", "export.deliver=int8",
                                      "search.sampler=grid", "search.trials=2"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    parent = client.get_run(report["mlflow"]["run_id"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.params["export.calibration_method"] for run in runs) == ["minmax", "percentile"]
    chosen = report["search"]["best_params"]["export.calibration_method"]
    resolved = yaml.safe_load((Path(report["run_dir"]) / "pipeline.yaml").read_text())
    assert resolved["export"]["calibration_method"] == chosen
    assert report["quantization"]["calibration_method"] == ("percentile 99.999" if chosen == "percentile" else chosen)


def test_a_budget_beside_a_searched_calibration_is_refused(workdir):
    result = cli("check", SEARCH, *sets("export.quantize=static", "export.int8_budget={max_accuracy_drop: 0.01}",
                                        "search.space={export.calibration_method: auto}"))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{SEARCH}: search.space.export.calibration_method: export.int8_budget keeps nodes"), line


def test_a_trial_is_built_and_measured_as_export_and_validate_build_and_measure_its_model(workdir, image_data):  # noqa: F811
    """One deploy path (kdpipe.deploy): with `export.input: uint8` and static INT8 drawn, the trial is scored on the
    uint8 graph calibrated on the stored images, in a session with validate's settings (not onnxruntime's
    defaults), and its recorded accuracy is exactly what validate's measurement gives the INT8 graph the run then
    builds from the same (reused) student, on the validation split."""
    import shutil

    from kdpipe.deploy import inputs_for, measure_model
    from kdpipe.runner import prepare
    from test_images import image_pipeline

    shutil.copytree(image_data["splits"], workdir / "pets")
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=3)
    space = ("search={trials: 1, sampler: random, pruner: none, objective: [val_accuracy, latency_p50], "
             "space: {kd: {temperature: {choices: [4.0]}}, export.quantize: {choices: [static]}}}")
    result = cli("run", path, "--until", "validate", *sets(
        *FAST, "teacher.train.epochs=3", "distill.epochs=2", "export.input=uint8", "export.quantize=static",
        "export.deliver=int8", "validate.graph_optimization=basic", "validate.inter_op_threads=1",
        "validate.gates.accuracy_min=0.0", "validate.gates.max_accuracy_drop_vs_teacher=1.0",
        "validate.gates.above_chance=null", "validate.gates.latency_p50_ms_max=1000", space))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["search"]["reused_checkpoint"] and report["quantization"]["delivered"] == "int8"
    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    parent = client.get_run(report["mlflow"]["run_id"])
    [trial] = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert trial.data.tags["kdpipe.graph_input"] == "uint8"
    settings = {k: report["validate"]["session"][k] for k in ("threads", "inter_op_threads", "graph_optimization")}
    assert json.loads(trial.data.tags["kdpipe.session"]) == settings == {"threads": 0, "inter_op_threads": 1,
                                                                          "graph_optimization": "basic"}

    run_dir = Path(report["run_dir"])
    prepared = prepare(run_dir / "pipeline.yaml", [])
    int8 = run_dir / "student.int8.onnx"
    measured = measure_model(int8, prepared.pipeline.validation, inputs_for(int8, prepared.data, "val"),
                             prepared.data.y_val.cpu().numpy(), [])
    assert trial.data.metrics["final/val_accuracy"] == measured["accuracy"]
