"""Stages as objects handing over typed results (issue 23): the stage list and --until come from the stage objects,
register reads results rather than the report, a failing gate raises GateFailed, and a run directory written by the
previous release's ledger layout says in one line that it cannot be resumed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, PIPELINES, cli, sets
from kdpipe.errors import GateFailed, InputError
from kdpipe.results import (DistillResult, ExportResult, Gate, RegisterResult, Results, SearchResult, StageResult,
                            TeacherResult, ValidateResult)

DIGITS = PIPELINES / "digits.yaml"


def test_the_stage_list_and_until_choices_come_from_the_stage_objects(tmp_path):
    from kdpipe.pipeline import load_pipeline
    from kdpipe.runner import STAGE_NAMES, run_pipeline, stages_to_run
    from kdpipe.stages import STAGES

    assert STAGE_NAMES == [s.name for s in STAGES]
    produced: set[type] = set()
    for stage in STAGES:  # every result a stage needs is produced by a stage before it, and each type by one stage
        assert set(stage.needs) <= produced, stage.name
        assert stage.produces not in produced
        produced.add(stage.produces)
    pipeline = load_pipeline(DIGITS, [])
    assert [s.name for s in stages_to_run(pipeline, None, False)] == [s.name for s in STAGES if s.name != "search"]
    assert [s.name for s in stages_to_run(pipeline, "distill", False)] == ["teacher", "distill"]
    assert [s.name for s in stages_to_run(pipeline, None, True)] == [s.name for s in STAGES if s.for_given_model]
    with pytest.raises(InputError) as refused:
        run_pipeline(DIGITS, [], tmp_path, until="deploy")
    assert refused.value.message == f"expected one of {', '.join(s.name for s in STAGES)}, got 'deploy'"


def validated(gates: tuple[Gate, ...] = ()) -> ValidateResult:
    return ValidateResult(onnx_path=Path("student.int8.onnx"), accuracy=0.95,
                          latency_ms={"64": {"p50": 2.0}, "1": {"p50": 0.5}}, size_bytes=2_000_000, precision="int8",
                          quantization="static", providers_used=["CPUExecutionProvider"], gates=gates)


def test_registry_tags_come_from_typed_results_without_a_report(tmp_path):
    from kdpipe.registry import version_tags

    (tmp_path / "pipeline.yaml").write_text("name: digits\n")
    gates = [Gate("parity_atol", 1e-6, 1e-4, True), Gate("accuracy_min", 0.95, 0.9, True)]
    pipeline = SimpleNamespace(name="digits", distill=SimpleNamespace(method="kd"))
    tags = version_tags(validated(), ExportResult(onnx_path=tmp_path / "student.onnx", input="uint8"), gates,
                        pipeline, tmp_path, tmp_path / "pipeline.yaml")
    assert tags["kdpipe.gates_passed"] == "true" and tags["kdpipe.method"] == "kd"
    assert (tags["kdpipe.precision"], tags["kdpipe.quantization"], tags["kdpipe.input"]) == ("int8", "static", "uint8")
    assert float(tags["kdpipe.metric.test_accuracy"]) == 0.95
    assert float(tags["kdpipe.metric.latency_p50_ms"]) == 0.5  # at the smallest batch size
    assert float(tags["kdpipe.metric.size_mb"]) == 2.0
    assert json.loads(tags["kdpipe.gate.accuracy_min"]) == {"value": 0.95, "limit": 0.9, "passed": True}
    assert tags["kdpipe.run_dir"] == str(tmp_path)


def test_register_reads_the_gates_of_the_results(tmp_path):
    from kdpipe.stages.register import Register

    results = Results()
    results.add(ExportResult(onnx_path=tmp_path / "student.onnx", gates=(Gate("parity_atol", 1e-6, 1e-4, True),)))
    results.add(validated((Gate("accuracy_min", 0.5, 0.9, False),)))
    ctx = SimpleNamespace(results=results, pipeline=SimpleNamespace(registry=None), tracker=None)
    result = Register().run(ctx)  # refuses before it talks to MLflow (no tracker here)
    assert isinstance(result, RegisterResult) and result.version is None
    assert result.report == {"mlflow": {"registry": "not registered: gate failed: accuracy_min"}}


def test_results_survive_the_ledger_as_they_were():
    kept = [TeacherResult(accuracy=0.9, report={"teacher": {"accuracy": 0.9}}, gates=(Gate("g", 0.1, 0.2, True),)),
            SearchResult(method="kd", params={"temperature": 4.0}, student_checkpoint=Path("/runs/x/best.pt")),
            DistillResult(accuracy_torch=0.8), validated(),
            ExportResult(onnx_path=Path("/runs/x/student.onnx"), teacher_onnx_path=Path("/runs/x/teacher.onnx")),
            RegisterResult(model_uri="models:/m/1", model_name="m", version="1")]
    for result in kept:
        assert type(result).from_json(json.loads(json.dumps(result.to_json()))) == result
    with pytest.raises(Exception):
        kept[0].accuracy = 0.5  # frozen: a later stage cannot change what an earlier one handed over
    assert isinstance(kept[0], StageResult)


def test_a_teacher_at_chance_raises_gate_failed_with_its_result():
    from kdpipe.stages.teacher import above_chance

    labels = torch.arange(100) % 10
    ctx = SimpleNamespace(pipeline=SimpleNamespace(validation=SimpleNamespace(gates=SimpleNamespace(above_chance=0.001))),
                          data=SimpleNamespace(y_test=labels))
    with pytest.raises(GateFailed) as failed:
        above_chance(ctx, TeacherResult(accuracy=0.1, report={"teacher": {"accuracy": 0.1}}))
    assert str(failed.value).startswith("teacher_above_chance: teacher test accuracy 0.1000 is not significantly")
    (gate,) = failed.value.result.gates
    assert gate.name == "teacher_above_chance" and not gate.passed
    assert failed.value.result.report["teacher"]["chance_rate"] == 0.1
    passed = above_chance(ctx, TeacherResult(accuracy=0.9, report={"teacher": {"accuracy": 0.9}}))
    assert passed.gates[0].passed


def test_a_run_that_failed_a_gate_ends_through_gate_failed(tmp_path):
    from kdpipe.cli import _report_outcome

    report = {"status": "failed", "student": {"accuracy": 0.5}, "teacher": None,
              "gates": {"accuracy_min": {"value": 0.5, "limit": 0.9, "passed": False},
                        "parity_atol": {"value": 0.0, "limit": 1e-4, "passed": True}}}
    with pytest.raises(GateFailed, match="^accuracy_min$"):
        _report_outcome(tmp_path / "report.json", report)


def test_a_run_directory_of_the_previous_layout_says_in_one_line_that_it_cannot_resume(workdir):
    first = cli("run", DIGITS, "--until", "teacher", *sets(*FAST))
    assert first.exit_code == 0, first.output
    run_dir = Path(first.stdout.strip().splitlines()[-1]).parent
    ledger = json.loads((run_dir / "ledger.json").read_text())
    # The previous release's ledger: the report with the finished stages' parts, the gates and the artifacts.
    teacher = ledger.pop("results")["teacher"]
    ledger.pop("layout")
    previous = {**ledger, "report": {**ledger["report"], **teacher["report"]}, "gates": teacher["gates"],
                "artifacts": {}}
    (run_dir / "ledger.json").write_text(json.dumps(previous))
    resumed = cli("run", "--resume", run_dir)
    assert resumed.exit_code == 2, resumed.output
    assert resumed.stderr.strip() == (
        f"{run_dir}: --resume: {run_dir} was written by an earlier kdpipe, whose ledger.json keeps no stage results, "
        f"so this kdpipe cannot resume it; start a new run with kdpipe run {run_dir / 'pipeline.yaml'}")
