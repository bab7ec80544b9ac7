"""OpenVINO as validate's second runtime (`validate.runtimes: [onnxruntime, openvino]`): the FP32, static INT8 and
QAT QDQ files run there with onnxruntime's predictions, a run reports and gates every model per runtime, a graph the
two runtimes compute differently fails the agreement gate alone, and a pipeline listing openvino where it does not
import is refused before anything runs."""

from __future__ import annotations

import os
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from conftest import FAST, LENIENT, PIPELINES, cli, enter_workdir, read_report, run_process, sets, tracked_nothing
from kdpipe.config import ValidateConfig
from kdpipe.deploy import measure_model
from kdpipe.errors import InputError
from kdpipe.onnx_runtime import predict, session
from kdpipe.openvino_runtime import compile_for_batch, measure_openvino

openvino = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'kdpipe[openvino]')")

DIGITS = PIPELINES / "digits.yaml"
BOTH = "validate.runtimes=[onnxruntime, openvino]"
QAT = ["export.quantize=qat", "export.qat_epochs=2"]  # QAT builds the static INT8 model too: three students
VALIDATE_GATES = ("above_chance", "accuracy_min", "max_accuracy_drop_vs_teacher", "latency_p50_ms_max:bs1")


@pytest.fixture(scope="module")
def both_runtimes(tmp_path_factory, teacher_cache, mlflow_store_template):
    """One FAST default-pipeline run with QAT, every model measured in onnxruntime and OpenVINO; with it, how many
    times onnxruntime predicted the test split per ONNX file name (spied on, the real functions still run)."""
    from kdpipe import deploy
    from kdpipe.stages import validate

    opened, predicted = {}, Counter()

    def spy_session(path, cfg, real=deploy.configured_session):
        found = real(path, cfg)
        opened[id(found)] = Path(path).name
        return found

    def spy_predict(sess, x, real=deploy.predict):
        predicted[opened.get(id(sess))] += len(x) == 359  # the test split
        return real(sess, x)

    with pytest.MonkeyPatch.context() as patch:
        workdir = enter_workdir(patch, tmp_path_factory.mktemp("openvino"), teacher_cache, mlflow_store_template)
        for module in (deploy, validate):
            patch.setattr(module, "configured_session", spy_session)
            patch.setattr(module, "predict", spy_predict)
        result = cli("run", DIGITS, *sets(*FAST, *LENIENT, *QAT, BOTH))
    assert result.exit_code == 0, result.output
    return workdir, read_report(result.stdout), predicted


def runtime_precisions(path: Path, cfg: ValidateConfig) -> set[str]:
    """The precisions OpenVINO runs the model's convolutions in."""
    core = openvino.Core()
    compiled = compile_for_batch(core, core.read_model(str(path)), 1, cfg)
    return {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"}


def test_fp32_static_int8_and_qat_files_run_in_openvino_as_in_onnxruntime(both_runtimes, digits):
    _, report, _ = both_runtimes
    run_dir = Path(report["run_dir"])
    x, y = digits.x_test.cpu().numpy(), digits.y_test.cpu().numpy()
    cfg = ValidateConfig(threads=1, batch_sizes=[1, 7, 64], warmup=2, runs=20)
    for name, quantized in (("student.onnx", False), ("student.int8.onnx", True), ("student.qat.onnx", True)):
        path = run_dir / name
        ops = Counter(node.op_type for node in onnx.load(path).graph.node)
        assert (ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0) == quantized, ops
        reference = predict(session(path), x)
        measured = measure_openvino(path, cfg, x, y, reference)
        parity = measured["parity_vs_onnxruntime"]
        assert parity["samples"] == len(x) == 359
        # Two INT8 kernels round differently, so images on a class boundary may flip: at most 3 of 359 on a
        # VNNI CPU, 4 of 359 on the QAT file on an AVX2-only AMD EPYC (onnxruntime without graph optimizations
        # agreed with itself optimized there; OpenVINO differed from both by one output step more)
        assert parity["agreement"] >= (0.985 if quantized else 0.99), (name, parity)
        if quantized:  # two INT8 kernels: the same scales, their own rounding
            assert 0 < parity["max_abs_diff"] < 0.5 and abs(measured["accuracy"] - (reference.argmax(1) == y).mean()) <= 0.01
        else:  # the same float arithmetic: the same classes, logits within float rounding
            assert parity["agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
            assert measured["accuracy"] == (reference.argmax(1) == y).mean()
        # INT8 runs as INT8 (u8 activations, i8 weights), FP32 in f32 (not bf16, which this CPU has)
        assert runtime_precisions(path, cfg) == ({"u8"} if quantized else {"f32"}), name
        assert set(measured["latency_ms"]) == {1, 7, 64}
        for b, stats in measured["latency_ms"].items():
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] and 5 <= stats["runs"] <= 20
            assert stats["throughput"] == pytest.approx(b * 1e3 / stats["mean"])
        assert measured["settings"] == {"threads": 1, "precision": "f32", "performance_hint": "LATENCY", "streams": 1}
        assert (measured["runtime"], measured["device"], measured["version"]) == ("openvino", "CPU",
                                                                                   openvino.get_version())
        assert measured["size_bytes"] == path.stat().st_size and measured["path"] == str(path)


def test_openvino_parity_reuses_the_logits_onnxruntime_measured_each_student_with(both_runtimes):
    """Each student's onnxruntime pass over the test split serves its accuracy, the report's evaluation and
    OpenVINO's parity: one pass per file, not a second one for the reference logits."""
    _, report, predicted = both_runtimes
    assert set(report["runtimes"]["openvino"]) >= {"fp32", "int8", "qat"}
    for name in ("student.onnx", "student.int8.onnx", "student.qat.onnx"):
        assert predicted[name] == 1, predicted


def test_a_run_reports_and_gates_every_model_in_both_runtimes(both_runtimes):
    workdir, report, _ = both_runtimes
    section = report["runtimes"]["openvino"]
    assert set(section) == {"version", "device", "settings", "delivered", "fp32", "int8", "qat", "teacher"}
    assert (section["version"], section["device"]) == (openvino.get_version(), "CPU")
    assert section["settings"]["precision"] == "f32" and section["settings"]["threads"] >= 1
    assert report["versions"]["openvino"] == version("openvino")
    delivered = section["delivered"]
    assert delivered == report["quantization"]["delivered"]
    onnxruntime = {**{name: report["quantization"][name] for name in ("fp32", "int8", "qat")},
                   "teacher": report["teacher"]["onnx"]}
    for name, model in onnxruntime.items():
        measured = section[name]
        assert measured["path"] == model["path"] and measured["size_bytes"] == model["size_bytes"]
        assert measured["parity_vs_onnxruntime"]["agreement"] >= (0.985 if name in ("int8", "qat") else 0.99)
        assert measured["parity_vs_onnxruntime"]["samples"] == 359
        assert abs(measured["accuracy"] - model["accuracy"]) <= 0.01
        assert set(measured["latency_ms"]) == {"1", "64"}
        assert all(0 < s["p50"] <= s["p90"] <= s["p99"] and s["runs"] == 50 for s in measured["latency_ms"].values())
    assert section["fp32"]["accuracy"] == onnxruntime["fp32"]["accuracy"]
    assert section["teacher"]["accuracy"] == onnxruntime["teacher"]["accuracy"]
    assert isinstance(section["teacher"]["cached"], bool)

    # The gates of the delivered model in OpenVINO, beside onnxruntime's, in the run's one table.
    gates, model = report["gates"], section[delivered]
    values = {"accuracy_min": model["accuracy"], "latency_p50_ms_max:bs1": model["latency_ms"]["1"]["p50"],
              "max_accuracy_drop_vs_teacher": section["teacher"]["accuracy"] - model["accuracy"]}
    for name in VALIDATE_GATES:
        assert gates[name]["passed"] and gates[f"openvino/{name}"]["passed"], name
        assert gates[f"openvino/{name}"]["limit"] == gates[name]["limit"]
    for name, value in values.items():
        assert gates[f"openvino/{name}"]["value"] == pytest.approx(value)
    agreement = model["parity_vs_onnxruntime"]["agreement"]
    assert gates["openvino/runtime_agreement_min"] == {"value": agreement, "limit": 0.99, "passed": True}

    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(report["mlflow"]["run_id"])
    metrics = run.data.metrics
    assert metrics["openvino/student/test_accuracy"] == model["accuracy"]
    assert metrics["openvino/latency_ms/p50_bs1"] == model["latency_ms"]["1"]["p50"]
    assert metrics["openvino/latency_ms/p99_bs64"] == model["latency_ms"]["64"]["p99"]
    assert metrics["openvino/throughput/bs64"] == model["latency_ms"]["64"]["throughput"]
    assert metrics["openvino/agreement"] == agreement
    assert metrics["gate/openvino/runtime_agreement_min"] == agreement
    assert metrics["student/test_accuracy"] == report["student"]["accuracy"]  # onnxruntime's, unprefixed as before


def centroid_classifier(path: Path, data, through_int64: bool = False, batch: int | str = "batch",
                        contrib_op: bool = False) -> Path:
    """A nearest-centroid digits classifier (scores: the flattened image · each class's training mean less the
    overall mean) as an ONNX file. `through_int64`: the scores squashed into (3e9, 4e9) and cast to int64 and back:
    onnxruntime keeps them, OpenVINO's CPU plugin computes int64 in int32, where each overflows to the same -2**31,
    and the argmax of that tie is class 0. `contrib_op`: a constant added to every score comes from onnxruntime's
    com.microsoft Inverse, which OpenVINO's ONNX frontend has no conversion for (2026.4)."""
    x = data.x_train.cpu().numpy().reshape(len(data.x_train), -1)
    y = data.y_train.cpu().numpy()
    w = (np.stack([x[y == c].mean(0) for c in range(data.num_classes)]) - x.mean(0)).T.astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["scores" if through_int64 else "logits"])]
    if through_int64:
        nodes += [helper.make_node("Sigmoid", ["scores"], ["squashed"]), helper.make_node("Mul", ["squashed", "k"], ["m"]),
                  helper.make_node("Add", ["m", "c"], ["shifted"]),
                  helper.make_node("Cast", ["shifted"], ["integers"], to=TensorProto.INT64),
                  helper.make_node("Cast", ["integers"], ["logits"], to=TensorProto.FLOAT)]
    if contrib_op:
        nodes[-1].output[0] = "scores"
        nodes += [helper.make_node("Inverse", ["two"], ["half"], domain="com.microsoft"),
                  helper.make_node("Reshape", ["half", "one"], ["offset"]),
                  helper.make_node("Add", ["scores", "offset"], ["logits"])]
    constants = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1e9, np.float32), "k"),
                 numpy_helper.from_array(np.array(3e9, np.float32), "c"),
                 numpy_helper.from_array(np.full((1, 1), 2.0, np.float32), "two"),
                 numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "centroids", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_a_fixed_batch_model_takes_only_its_batch_size(tmp_path, digits):
    """As measure_model: validate.batch_sizes must be the model's one batch size; accuracy pads the last chunk."""
    path = centroid_classifier(tmp_path / "fixed.onnx", digits, batch=2)
    x, y = digits.x_test.cpu().numpy(), digits.y_test.cpu().numpy()
    reference = predict(session(path), x)
    with pytest.raises(InputError) as refused:
        measure_openvino(path, ValidateConfig(), x, y, reference)
    assert (refused.value.key, refused.value.message) == (
        "validate.batch_sizes", "fixed.onnx has a fixed batch size 2; set validate.batch_sizes to [2]")
    cfg = ValidateConfig(batch_sizes=[2], warmup=1, runs=5)
    measured = measure_openvino(path, cfg, x, y, reference)
    assert len(x) % 2 == 1 and measured["parity_vs_onnxruntime"]["agreement"] == 1.0
    assert measured["accuracy"] == measure_model(path, cfg, x, y)["accuracy"] > 0.85
    assert set(measured["latency_ms"]) == {2}


def test_a_graph_the_runtimes_compute_differently_fails_only_the_agreement_gate(both_runtimes, workdir, digits):
    """`kdpipe validate` of a model whose int64 values OpenVINO's CPU plugin computes in int32: onnxruntime's gates
    pass, OpenVINO agrees on the test images it predicts as class 0 alone, and that gate's failure is exit 1. The
    gates reading OpenVINO's accuracy are off, so the agreement gate is the one that fails."""
    model = centroid_classifier(workdir / "int64.onnx", digits, through_int64=True)
    off = ["validate.gates.above_chance=null", "validate.gates.accuracy_min=null",
           "validate.gates.max_accuracy_drop_vs_teacher=null"]
    result = cli("validate", model, "--pipeline", DIGITS, *sets(*FAST, BOTH, *off))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == "gate failed: openvino/runtime_agreement_min"
    report = read_report(result.stdout)
    section = report["runtimes"]["openvino"]
    assert section["delivered"] == "fp32" and set(section) == {"version", "device", "settings", "delivered", "fp32",
                                                               "teacher"}
    x, y = digits.x_test.cpu().numpy(), digits.y_test.cpu().numpy()
    predicted_zero = (predict(session(model), x).argmax(1) == 0).mean()  # by onnxruntime
    assert report["student"]["accuracy"] > 0.85 and section["fp32"]["accuracy"] == (y == 0).mean() < 0.15
    assert section["fp32"]["parity_vs_onnxruntime"]["agreement"] == predicted_zero < 0.15
    assert {name: g["passed"] for name, g in report["gates"].items() if not g["passed"]} == {
        "openvino/runtime_agreement_min": False}
    assert report["gates"]["openvino/latency_p50_ms_max:bs1"]["passed"]
    # The teacher's OpenVINO measurement came from the cache the run with the same settings filled.
    teacher = section["teacher"]
    assert teacher["cached"] is True
    assert teacher["accuracy"] == both_runtimes[1]["runtimes"]["openvino"]["teacher"]["accuracy"]
    assert teacher["latency_ms"] == both_runtimes[1]["runtimes"]["openvino"]["teacher"]["latency_ms"]


def test_a_delivered_model_openvino_cannot_run_fails_its_gate_and_the_others_are_still_measured(both_runtimes,
                                                                                                 workdir, digits):
    model = centroid_classifier(workdir / "contrib.onnx", digits, contrib_op=True)
    loose = ["validate.gates.accuracy_min=0.5", "validate.gates.max_accuracy_drop_vs_teacher=0.5"]
    result = cli("validate", model, "--pipeline", DIGITS, *sets(*FAST, BOTH, *loose))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == "gate failed: openvino/runs_delivered_model"
    assert "warning: openvino cannot run the fp32 model: No conversion rule found for operations: " \
           "com.microsoft.Inverse" in result.stderr
    report = read_report(result.stdout)
    section = report["runtimes"]["openvino"]
    assert section["fp32"] == {"error": "No conversion rule found for operations: com.microsoft.Inverse"}
    assert section["teacher"]["accuracy"] > 0.85  # the teacher still measured (from the cache)
    assert report["student"]["accuracy"] > 0.85  # onnxruntime runs it
    failed = {name for name, g in report["gates"].items() if not g["passed"]}
    assert failed == {"openvino/runs_delivered_model"}


@pytest.mark.parametrize("override, key, message", [
    ("validate.runtimes=[openvino]", "validate.runtimes",
     "expected onnxruntime among them (its measurements choose the delivered model), got ['openvino']; e.g. "
     "[onnxruntime, openvino]"),
    ("validate.runtimes=[onnxruntime, openvino, openvino]", "validate.runtimes",
     "expected distinct runtimes, got openvino more than once"),
    ("validate.runtimes=[onnxruntime, tensorrt]", "validate.runtimes.1",
     "expected one of 'onnxruntime' or 'openvino', got 'tensorrt'"),
    ("validate.gates.runtime_agreement_min=1.5", "validate.gates.runtime_agreement_min", "expected a value ≤ 1.0, got 1.5"),
])
def test_runtime_settings_are_checked(workdir, override, key, message):
    result = cli("check", DIGITS, "--set", override)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"{DIGITS}: {key}: {message}"]


def test_without_openvino_a_pipeline_listing_it_is_refused_before_anything_runs(workdir):
    """A fresh interpreter where `import openvino` fails: check and run exit 2 in one line naming the file, the key
    and the extra, and the run leaves no run directory and tracks nothing."""
    shim = workdir / "shim"
    (shim / "openvino").mkdir(parents=True)
    (shim / "openvino" / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])}
    expected = f"{DIGITS}: validate.runtimes: openvino is not installed: pip install 'kdpipe[openvino]'"
    for command in ("check", "run"):
        proc = run_process(command, DIGITS, "--set", BOTH, *(["--runs-dir", workdir / "runs"] if command == "run" else []),
                           env=env)
        assert (proc.returncode, proc.stderr.strip().splitlines(), proc.stdout) == (2, [expected], ""), proc.stderr
    assert not (workdir / "runs").exists()
    assert tracked_nothing(workdir)
