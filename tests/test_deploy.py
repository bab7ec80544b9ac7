"""Deployment checks: parity over batch sizes, teacher ONNX, INT8 side by side with FP32, gates, `kdpipe validate`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import FAST, LENIENT, PIPELINES, cli, enter_workdir, read_report, sets

DIGITS = PIPELINES / "digits.yaml"
# An execution provider no Linux onnxruntime build has, so that fallback is certain on every CI machine.
ABSENT_PROVIDER = "CoreMLExecutionProvider"



@pytest.fixture(scope="module")
def deployed(tmp_path_factory, teacher_cache, mlflow_store_template):
    """One run of the default pipeline (static INT8, deliver best) with its CLI result and report."""
    with pytest.MonkeyPatch.context() as mp:
        workdir = enter_workdir(mp, tmp_path_factory.mktemp("deploy"), teacher_cache, mlflow_store_template)
        result = cli("run", DIGITS, *sets(*FAST, *LENIENT))
        assert result.exit_code == 0, result.output
        yield workdir, result, read_report(result.stdout)


@pytest.fixture
def in_deploy_dir(deployed, monkeypatch, teacher_cache):
    workdir = deployed[0]
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(teacher_cache))
    return workdir


def test_parity_over_batch_sizes_on_validation_inputs(deployed):
    _, _, report = deployed
    onnx_report = report["onnx"]
    assert set(onnx_report["parity_by_batch_size"]) == {"1", "2", "7", "64", str(report["data"]["val"])}
    for diffs in onnx_report["parity_by_batch_size"].values():
        assert 0 <= diffs["max_abs_diff"] <= 1e-4 and 0 <= diffs["max_rel_diff"] < 1e-3
    assert onnx_report["parity_max_abs_diff"] == max(d["max_abs_diff"] for d in onnx_report["parity_by_batch_size"].values())
    assert report["gates"]["parity_atol"] == {"value": onnx_report["parity_max_abs_diff"], "limit": 1e-4, "passed": True}


def test_teacher_is_exported_and_timed_the_same_way(deployed):
    _, _, report = deployed
    teacher_onnx = report["teacher"]["onnx"]
    assert Path(teacher_onnx["path"]).name == "teacher.onnx" and teacher_onnx["parity_max_abs_diff"] <= 1e-4
    assert abs(teacher_onnx["accuracy"] - report["teacher"]["accuracy"]) < 0.01
    for b in ("1", "64"):
        student, teacher = report["latency_ms"][b], teacher_onnx["latency_ms"][b]
        assert teacher["runs"] == student["runs"] == 50
        assert report["speedup_vs_teacher"][b] == pytest.approx(teacher["p50"] / student["p50"])
    assert teacher_onnx["size_bytes"] > 10 * report["onnx"]["size_bytes"]


def int8_weights(path: Path) -> dict[str, np.ndarray]:
    """A quantized model's int8 weight tensors by name (zero points are int8 too, but one number per channel)."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return {name: a for name, a in arrays.items() if a.dtype == np.int8 and a.ndim >= 2}


def test_int8_weights_are_7_bit_by_default_so_cpus_without_vnni_compute_them_exactly(deployed, digits, tmp_path):
    """x86 CPUs without VNNI multiply uint8 activations by int8 weights in pairs summed in 16 bits, which saturate
    past 32767: 255 * 127 * 2 does, 255 * 64 * 2 = 32640 does not. On such a CPU (the AMD EPYC this was found on)
    the default pipeline's full-range static INT8 student lost 30 points in onnxruntime and agreed with OpenVINO on
    half the test images. By default every INT8 weight is in [-64, 64]; export.int8_weight_bits 8 uses the full
    range, for CPUs that multiply exactly."""
    from kdpipe.config import ExportConfig
    from kdpipe.deploy import calibration_batches
    from kdpipe.quantize import quantize

    _, _, report = deployed
    assert report["quantization"]["weight_bits"] == 7
    weights = int8_weights(Path(report["quantization"]["int8"]["path"]))
    assert len(weights) == 3  # two convolutions and the classifier
    assert max(int(np.abs(w).max()) for w in weights.values()) == 64

    fp32 = Path(report["quantization"]["fp32"]["path"])
    calibration = calibration_batches(digits, ExportConfig(calibration_batches=2), 64, 0)
    for mode, bits, largest in (("static", 8, 127), ("dynamic", 7, 64), ("dynamic", 8, 127)):
        built = tmp_path / f"{mode}-{bits}.onnx"
        quantize(fp32, built, mode, calibration if mode == "static" else None, weight_bits=bits)
        assert max(int(np.abs(w).max()) for w in int8_weights(built).values()) == largest, (mode, bits)


def test_int8_is_validated_side_by_side_with_fp32(deployed):
    """Acceptance 3: the default pipeline's INT8 model next to FP32 in report.json, and `best` picks honestly."""
    _, _, report = deployed
    quant = report["quantization"]
    assert quant["mode"] == "static" and quant["deliver"] == "best" and quant["calibration_samples"] == 8 * 64
    assert quant["calibration_method"] == "minmax"
    fp32, int8 = quant["fp32"], quant["int8"]
    for model in (fp32, int8):
        assert 0.5 < model["accuracy"] <= 1.0 and model["size_bytes"] > 0
        assert set(model["latency_ms"]) == {"1", "64"}
    assert quant["accuracy_drop"] == pytest.approx(fp32["accuracy"] - int8["accuracy"])
    assert abs(quant["accuracy_drop"]) < 0.05
    assert quant["size_ratio"] == pytest.approx(int8["size_bytes"] / fp32["size_bytes"])
    for b in ("1", "64"):
        assert quant["speedup_by_batch_size"][b] == pytest.approx(fp32["latency_ms"][b]["p50"] / int8["latency_ms"][b]["p50"])

    int8_wins = all(s > 1 for s in quant["speedup_by_batch_size"].values()) and quant["accuracy_drop"] <= 0.01
    assert quant["delivered"] == ("int8" if int8_wins else "fp32"), quant["reason"]
    delivered = int8 if quant["delivered"] == "int8" else fp32
    assert report["onnx"]["precision"] == quant["delivered"] and report["onnx"]["path"] == delivered["path"]
    assert report["student"]["accuracy"] == delivered["accuracy"]

    # The INT8 file holds QDQ nodes and reproduces its reported accuracy.
    ops = {node.op_type for node in onnx.load(int8["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sess = ort.InferenceSession(int8["path"], providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {"input": np.zeros((5, 1, 8, 8), np.float32)})[0]).all()


def test_every_gate_is_in_the_console_table(deployed):
    _, result, report = deployed
    table = result.stderr[result.stderr.index("gate "):]
    for name, gate in report["gates"].items():
        assert name in table and gate["passed"]
    # providers: auto takes CUDA when this onnxruntime has it, else CPU, and says nothing about it.
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    resolved = ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    assert "delivering " in result.stderr and "was requested but" not in result.stderr
    assert report["validate"]["providers_requested"] == "auto" and report["validate"]["providers_resolved"] == resolved
    assert report["validate"]["provider_fallback"] == [] and report["validate"]["providers_used"][0] == resolved[0]
    assert report["validate"]["session"]["graph_optimization"] == "all"
    assert report["validate"]["session"]["budget_s"] == 2.0


def test_percentile_calibration_narrows_an_activation_range_that_outliers_stretch(tmp_path):
    """One input value of 400 among N(0, 1) ones: minmax stretches the input's 8-bit range to it, percentile 99
    clips it, so the input's QuantizeLinear scale is smaller and the model follows FP32 on the rest."""
    import torch
    from torch import nn

    from kdpipe.onnx_export import export_onnx
    from kdpipe.quantize import quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    export_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path / "fp32.onnx", 18, True)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((64, 1, 8, 8)).astype(np.float32) for _ in range(4)]
    batches[0][0, 0, 0, 0] = 400.0

    quantize(tmp_path / "fp32.onnx", tmp_path / "minmax.onnx", "static", batches)
    quantize(tmp_path / "fp32.onnx", tmp_path / "percentile.onnx", "static", batches, "percentile", 99.0)
    full, clipped = (activation_scales(tmp_path / f"{name}.onnx")["input"] for name in ("minmax", "percentile"))
    assert full > 400 / 255
    assert clipped < full / 10
    x = rng.standard_normal((256, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy().argmax(1)
    agree = {name: (ort.InferenceSession(str(tmp_path / f"{name}.onnx")).run(None, {"input": x})[0].argmax(1)
                    == expected).mean() for name in ("minmax", "percentile")}
    assert agree["percentile"] > agree["minmax"]


def test_a_run_calibrates_by_the_configured_method_and_reports_it(deployed, workdir):
    """The same student as the deployed run's, calibrated on percentile 99 rather than minmax: every activation
    range is at most as wide, the input's narrower."""
    _, _, minmax = deployed
    result = cli("run", DIGITS, *sets(*FAST, *LENIENT, "export.calibration_method=percentile",
                                      "export.calibration_percentile=99"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["quantization"]["calibration_method"] == "percentile 99"
    assert report["quantization"]["fp32"]["accuracy"] == minmax["quantization"]["fp32"]["accuracy"]  # same student
    clipped, full = (activation_scales(r["quantization"]["path"]) for r in (report, minmax))
    assert clipped.keys() == full.keys() and clipped["input"] < full["input"]
    assert all(clipped[name] <= full[name] * (1 + 1e-6) for name in full)


def activation_scales(path) -> dict[str, float]:
    """The per-tensor scale of each QuantizeLinear in a static INT8 model, by the tensor it quantizes."""
    graph = onnx.load(path).graph
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: float(values[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"
            and n.input[1] in values and values[n.input[1]].size == 1}


def test_validate_command_reproduces_the_run(deployed, in_deploy_dir):
    _, _, run_report = deployed
    fp32 = run_report["quantization"]["fp32"]
    result = cli("validate", fp32["path"], "--pipeline", DIGITS, *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed"
    assert report["student"]["accuracy"] == fp32["accuracy"]
    assert set(report["stage_seconds"]) == {"teacher", "export", "validate"}
    assert report["onnx"]["path"] == fp32["path"] and report["onnx"]["parity_max_abs_diff"] is None
    assert "parity_atol" not in report["gates"] and set(report["gates"]) >= {"accuracy_min", "latency_p50_ms_max:bs1"}
    assert report["teacher"]["onnx"]["latency_ms"]["64"]["runs"] == 50
    assert "quantization" not in report  # a given model is validated as it is
    # The frozen teacher's ONNX was measured with these settings by the run: its numbers come from the cache.
    assert report["teacher"]["onnx"]["cached"] is True
    assert report["teacher"]["onnx"]["latency_ms"] == run_report["teacher"]["onnx"]["latency_ms"]
    assert report["teacher"]["onnx"]["accuracy"] == run_report["teacher"]["onnx"]["accuracy"]
    assert "teacher accuracy and latency from cache" in result.stderr

    int8 = run_report["quantization"]["int8"]
    result = cli("validate", int8["path"], "--pipeline", DIGITS, *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.output
    assert read_report(result.stdout)["student"]["accuracy"] == int8["accuracy"]


def test_tight_gates_fail_and_the_report_marks_them(deployed, in_deploy_dir):
    path = deployed[2]["quantization"]["fp32"]["path"]
    result = cli("validate", path, "--pipeline", DIGITS, *sets(
        *FAST, *LENIENT, "validate.gates.latency_p99_ms_max={64: 1.0e-6}", "validate.gates.size_mb_max=1.0e-6",
        "validate.gates.speedup_vs_teacher_min={1: 1000}"))
    assert result.exit_code == 1, result.output
    report = read_report(result.stdout)
    gates = report["gates"]
    assert report["status"] == "failed"
    assert gates["accuracy_min"]["passed"] and gates["latency_p50_ms_max:bs1"]["passed"]
    failed = {name for name, g in gates.items() if not g["passed"]}
    assert failed == {"latency_p99_ms_max:bs64", "size_mb_max", "speedup_vs_teacher_min:bs1"}
    assert gates["size_mb_max"]["value"] == pytest.approx(report["onnx"]["size_bytes"] / 1e6)
    assert "gate failed: latency_p99_ms_max:bs64, speedup_vs_teacher_min:bs1, size_mb_max" in result.stderr
    assert "FAILED" in result.stderr


def test_a_listed_provider_that_is_missing_falls_back_or_is_refused_up_front(deployed, in_deploy_dir):
    path = deployed[2]["quantization"]["fp32"]["path"]
    providers = f"validate.providers=[{ABSENT_PROVIDER}, CPUExecutionProvider]"
    result = cli("validate", path, "--pipeline", DIGITS, *sets(*FAST, *LENIENT, providers))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["validate"]["provider_fallback"] == [ABSENT_PROVIDER]
    assert report["validate"]["providers_used"] == ["CPUExecutionProvider"]
    assert f"{ABSENT_PROVIDER} was requested but is not available in this onnxruntime" in result.stderr
    # With require_provider the run could only fail: it is refused before anything runs or is written.
    run_dirs = set((in_deploy_dir / "runs" / "digits").iterdir())
    result = cli("validate", path, "--pipeline", DIGITS, *sets(*FAST, *LENIENT, providers, "validate.require_provider=true"))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"{DIGITS}: validate.providers: {ABSENT_PROVIDER} is not available in this onnxruntime and require_provider "
        "is true; use providers: auto, or install onnxruntime-gpu on a CUDA machine"]
    assert set((in_deploy_dir / "runs" / "digits").iterdir()) == run_dirs


def test_latency_is_measured_within_the_budget(digits, tmp_path):
    """At most `runs` timed calls, no more than budget_s allows, and never fewer than 5."""
    import torch

    from kdpipe.models.zoo import CNN
    from kdpipe.onnx_runtime import MIN_TIMED_RUNS, measure_latency, session
    from kdpipe.onnx_export import export_onnx

    path = tmp_path / "cnn.onnx"
    export_onnx(CNN((1, 8, 8), 10, width=8, depth=2), torch.zeros(2, 1, 8, 8), path, 18, True)
    sess = session(path)
    x = digits.x_test.numpy()
    assert measure_latency(sess, x, 1, warmup=2, runs=40, budget_s=60.0)["runs"] == 40  # the count caps it
    assert measure_latency(sess, x, 1, warmup=2, runs=10_000, budget_s=1e-6)["runs"] == MIN_TIMED_RUNS
    start = time.perf_counter()
    timed = measure_latency(sess, x, 64, warmup=1_000_000, runs=1_000_000, budget_s=0.3)
    assert MIN_TIMED_RUNS <= timed["runs"] < 1_000_000 and time.perf_counter() - start < 3.0


def test_validate_rejects_what_is_not_a_classifier_for_this_data(in_deploy_dir):
    run_dirs = set((in_deploy_dir / "runs" / "digits").iterdir())
    missing = cli("validate", "nowhere.onnx", "--pipeline", DIGITS)
    assert missing.exit_code == 2 and "MODEL: model file not found: nowhere.onnx" in missing.stderr
    (in_deploy_dir / "junk.onnx").write_bytes(b"not a model")
    junk = cli("validate", "junk.onnx", "--pipeline", DIGITS)
    assert junk.exit_code == 2 and "onnxruntime cannot load junk.onnx" in junk.stderr
    assert set((in_deploy_dir / "runs" / "digits").iterdir()) == run_dirs  # bad input leaves no run directory


@pytest.mark.parametrize("override, message", [
    (["export.quantize=none", "export.deliver=int8"], "export: deliver 'int8' needs an INT8 model"),
    (["validate.providers=[CUDAExecutionProvidr]"], "unknown execution provider 'CUDAExecutionProvidr' (did you mean 'CUDAExecutionProvider'?)"),
    (["validate.gates.latency_p99_ms_max={32: 1.0}"], "gates.latency_p99_ms_max names batch size 32, which is not in batch_sizes [1, 64]"),
    (["validate.graph_optimization=max"], "validate.graph_optimization: expected one of"),
    (["export.calibration_method=median"], "export.calibration_method: expected one of"),
    (["export.calibration_percentile=100.5"], "export.calibration_percentile"),
])
def test_bad_deployment_settings_exit_2(workdir, override, message):
    result = cli("check", DIGITS, *sets(*override))
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr


def test_registry_policy_in_mlflow_yaml_is_validated(workdir):
    (workdir / "mlflow.yaml").write_text("registry: {primary_metric: loss}\n")
    result = cli("run", DIGITS, *sets(*FAST))
    assert result.exit_code == 2 and "registry.primary_metric" in result.stderr, result.stderr
    assert not (workdir / "runs").exists()


def test_dynamic_quantization_keeps_the_accuracy(deployed, tmp_path):
    from kdpipe.quantize import quantize

    fp32 = deployed[2]["quantization"]["fp32"]
    path = tmp_path / "dynamic.onnx"
    quantize(Path(fp32["path"]), path, "dynamic")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "ConvInteger" in ops or "DynamicQuantizeLinear" in ops
    result = cli("validate", path, "--pipeline", DIGITS, *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.output
    assert abs(read_report(result.stdout)["student"]["accuracy"] - fp32["accuracy"]) < 0.05


def test_best_delivery_takes_int8_only_when_it_wins():
    from kdpipe.stages.validate import choose_delivery

    def model(accuracy, p50_bs1, p50_bs64):
        return {"accuracy": accuracy, "latency_ms": {1: {"p50": p50_bs1}, 64: {"p50": p50_bs64}}}

    fp32 = model(0.97, 0.02, 0.10)
    passing = [("accuracy_min", 0.97, 0.9, True)]
    assert choose_delivery("best", fp32, model(0.965, 0.01, 0.05), passing, 0.01)[0] == "int8"
    slower = choose_delivery("best", fp32, model(0.97, 0.01, 0.20), passing, 0.01)
    assert slower == ("fp32", "INT8 is not faster than FP32 at batch size 64 (p50)")
    assert choose_delivery("best", fp32, model(0.90, 0.01, 0.05), passing, 0.01)[0] == "fp32"
    failing = [("latency_p99_ms_max:bs1", 3.0, 1.0, False)]
    assert choose_delivery("best", fp32, model(0.97, 0.01, 0.05), failing, 0.01) == (
        "fp32", "INT8 fails gate latency_p99_ms_max:bs1")
    assert choose_delivery("int8", fp32, model(0.5, 1.0, 1.0), failing, 0.01)[0] == "int8"  # the user's choice stands


def test_exports_in_one_process_parse_onnxscripts_operators_once(tmp_path):
    """torch.onnx.export rebuilds onnxscript's operator list on every call (1.6 s each on 2 cores); kdpipe's exports
    share one list per process, and each graph still computes its own model."""
    import importlib

    import torch
    from torch.onnx._internal import _lazy_import

    from kdpipe.models.zoo import CNN
    from kdpipe.onnx_export import export_onnx, reuse_torchlib_ops
    from kdpipe.onnx_runtime import session

    x = torch.randn(3, 1, 8, 8)
    for width in (4, 8):
        model = CNN((1, 8, 8), 10, width=width, depth=2).eval()
        export_onnx(model, x, tmp_path / f"w{width}.onnx", 18, True)
        logits = session(tmp_path / f"w{width}.onnx").run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(logits, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert reuse_torchlib_ops()  # the installed torch and onnxscript have the layout it relies on
    ops = importlib.import_module(_lazy_import.onnxscript_apis._name).get_torchlib_ops
    assert ops.cache_info().misses == 1 and ops.cache_info().hits >= 1


@pytest.mark.parametrize("available, chosen", [
    (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "OpenVINOExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_providers_auto_takes_tensorrt_then_cuda_where_present_and_the_cpu_last(available, chosen):
    from kdpipe.onnx_runtime import auto_providers

    assert auto_providers(available) == chosen
