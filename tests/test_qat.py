"""Quantization-aware distillation (`export.quantize: qat`): QDQ ONNX that onnxruntime runs and that follows the
fake-quantized PyTorch model, resume after SIGKILL inside the QAT phase, delivery among FP32/static/QAT, and the
settings QAT cannot work with (exit 2, one line naming export.quantize)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import (FAST, LENIENT, ONE_THREAD, PIPELINES, cli, enter_workdir, read_report, read_until, run_process,
                      sets, start_run, write_pipeline)

QAT = ["export.quantize=qat", "export.qat_epochs=2", "export.deliver=int8"]  # deliver int8: the QAT model ships


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, teacher_cache, mlflow_store_template):
    """One FAST default-pipeline run with quantize qat (in-process), shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as patch:
        workdir = enter_workdir(patch, tmp_path_factory.mktemp("qat"), teacher_cache, mlflow_store_template)
        result = cli("run", PIPELINES / "digits.yaml", *sets(*FAST, *LENIENT, *QAT))
    assert result.exit_code == 0, result.output
    return workdir, result, read_report(result.stdout)


def rebuild_fake_quantized(run_dir, data):
    """The run's fine-tuned fake-quantized student, rebuilt from student.pt and the QAT phase's checkpoint."""
    from kdpipe.config import ModelConfig
    from kdpipe.models import build_model
    from kdpipe.qat import fake_quantize, freeze

    student = build_model(ModelConfig(arch="cnn", width=8, depth=2), "student.model", data.input_shape, data.num_classes)
    student.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True)["student"])
    fake_quantized = fake_quantize(student, data.x_val[:2], weight_bits=7)
    saved = torch.load(run_dir / "checkpoints" / "qat" / "0-qat.pt", weights_only=True)
    assert saved["finished"] and saved["epoch"] == 2
    fake_quantized.load_state_dict(saved["modules"][0])
    return freeze(fake_quantized)


def test_qat_onnx_is_qdq_runs_in_onnxruntime_and_follows_the_fake_quantized_model(qat_run, digits):
    """Acceptance 1: QuantizeLinear/DequantizeLinear nodes, onnxruntime runs them, and the predictions agree with
    the fake-quantized PyTorch model on ≥ 99% of the validation samples."""
    _, result, report = qat_run
    run_dir = Path(report["run_dir"])
    path = run_dir / "student.qat.onnx"
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 3, ops
    # Weights are stored as INT8 tensors (constants), dequantized per output channel in the graph.
    constants = [*model.graph.initializer, *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute)]
    int8_weights = [t for t in constants if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8_weights) == 3, [(t.name, t.data_type, list(t.dims)) for t in constants]  # 2 convs and fc
    # export.int8_weight_bits 7 (the default): the fake quantizers' [-64, 63], which fine-tuning past the observed
    # range does not widen in the file
    largest = [int(np.abs(onnx.numpy_helper.to_array(t)).max()) for t in int8_weights]
    assert max(largest) == 64 and all(w <= 64 for w in largest), largest
    assert min(int(onnx.numpy_helper.to_array(t).min()) for t in int8_weights) == -64
    assert {p.key: p.value for p in model.metadata_props}["kdpipe.quantization"] == "qat"

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x_val = digits.x_val.numpy()
    onnx_logits = sess.run(None, {"input": x_val})[0]
    assert onnx_logits.shape == (len(x_val), 10) and np.isfinite(onnx_logits).all()

    fake_quantized = rebuild_fake_quantized(run_dir, digits)
    with torch.no_grad():
        torch_logits = fake_quantized(digits.x_val).numpy()
    agreement = (onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()
    assert agreement >= 0.99, agreement
    assert report["quantization"]["qat"]["parity"]["agreement"] == pytest.approx(agreement)
    assert report["quantization"]["qat"]["parity"]["against"] == "fake-quantized PyTorch student"


def test_the_qdq_export_keeps_weights_in_the_range_the_fake_quantized_model_trained_with(tmp_path):
    """convert_fx rounds weights with the observers' scales but clamps them to int8's range only: weights that grew
    past the moving-average range during fine-tuning exported as up to 67 where the fake-quantized model (and so
    every accuracy kdpipe measured of it) clamps at 63. The export clamps them to the fake quantizer's range."""
    from kdpipe.config import ModelConfig
    from kdpipe.models import build_model
    from kdpipe.onnx_runtime import predict as ort_predict, session
    from kdpipe.qat import calibrate, export_qdq, fake_quantize, freeze

    torch.manual_seed(0)
    student = build_model(ModelConfig(arch="cnn", width=8, depth=2), "student.model", (1, 8, 8), 10).eval()
    x = torch.rand(256, 1, 8, 8)
    for bits, (low, high) in ((7, (-64, 63)), (8, (-128, 127))):
        fake_quantized = fake_quantize(student, x[:2], weight_bits=bits)
        calibrate(fake_quantized, [b.numpy() for b in x.split(64)], torch.device("cpu"))
        with torch.no_grad():  # as fine-tuning does: weights past the range the observers saw
            for module in fake_quantized.modules():
                if hasattr(module, "weight_fake_quant"):
                    module.weight.mul_(1.1)
        fake_quantized = freeze(fake_quantized)
        export_qdq(fake_quantized, x[:2], tmp_path / f"{bits}.onnx", opset=18, dynamic_batch=True)
        model = onnx.load(tmp_path / f"{bits}.onnx")
        weights = [onnx.numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.t.data_type == onnx.TensorProto.INT8 and len(a.t.dims) > 1]
        assert len(weights) == 3 and min(int(w.min()) for w in weights) == low, bits
        assert max(int(w.max()) for w in weights) == high, bits
        with torch.no_grad():
            expected = fake_quantized(x).numpy()
        got = ort_predict(session(tmp_path / f"{bits}.onnx"), x.numpy())
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99, bits


def test_fp32_static_and_qat_are_compared_side_by_side_and_the_qat_model_is_registered(qat_run):
    workdir, result, report = qat_run
    quant = report["quantization"]
    assert quant["mode"] == "qat" and quant["delivered"] == "qat", quant["reason"]
    compared = quant["compared"]
    assert set(compared) == {"fp32", "static", "qat"}
    for name, row in compared.items():
        assert 0.5 < row["accuracy"] <= 1 and row["size_bytes"] > 0 and set(row["p50_ms"]) == {"1", "64"}, name
    assert compared["fp32"]["parity"] is None
    assert compared["static"]["parity"]["against"] == "fp32 PyTorch student"
    assert compared["static"]["parity"]["agreement"] >= 0.9
    assert compared["qat"]["size_bytes"] < compared["fp32"]["size_bytes"]
    assert report["onnx"] == {**report["onnx"], "path": quant["qat"]["path"], "precision": "int8", "quantization": "qat"}
    assert report["student"]["accuracy"] == compared["qat"]["accuracy"]
    assert "qat epoch 2/2" in result.stderr

    import mlflow

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version("digits-student", report["mlflow"]["model_version"])
    assert version.tags["kdpipe.quantization"] == "qat" and version.tags["kdpipe.precision"] == "int8"
    assert client.get_run(report["mlflow"]["run_id"]).data.tags["kdpipe.quantization"] == "qat"
    mlflow.set_tracking_uri(store)
    registered = mlflow.onnx.load_model(f"models:/digits-student/{version.version}")
    assert {p.key: p.value for p in registered.metadata_props}["kdpipe.quantization"] == "qat"
    assert "QuantizeLinear" in {node.op_type for node in registered.graph.node}


def test_the_qat_epochs_are_kept_and_drawn_after_the_distillation_epochs(qat_run):
    _, _, report = qat_run
    fine_tuned = report["quantization"]["qat"]["history"]["qat"]
    assert fine_tuned["epoch"] == [1, 2] and len(fine_tuned["val_accuracy"]) == 2
    assert all(value > 0 for value in fine_tuned["train_loss"])
    html = Path(report["report_html"]["path"]).read_text()
    assert "Quantization-aware fine-tuning (qat): epochs 7 on" in html  # FAST distils 6 epochs
    curves = html[html.index("<h2>Learning curves</h2>"):html.index("<h2>Test predictions</h2>")]
    assert ">qat loss<" in curves and ">qat<" in curves  # the legend's entries for its loss and its accuracy


def test_every_candidate_has_latency_percentiles_throughput_size_and_the_session_it_was_measured_in(qat_run):
    """FP32, static INT8 and QAT INT8 are measured alike: p50/p90/p99 and throughput per validated batch size, the
    file's size, and the session settings read back from the session that timed them (validate's)."""
    _, _, report = qat_run
    quantization = report["quantization"]
    settings = {k: report["validate"]["session"][k] for k in ("threads", "inter_op_threads", "graph_optimization")}
    for name in ("fp32", "int8", "qat"):
        candidate = quantization[name]
        assert candidate["size_bytes"] == Path(candidate["path"]).stat().st_size > 0
        assert candidate["session"] == settings
        assert set(candidate["latency_ms"]) == {"1", "64"}
        for batch_size, stats in candidate["latency_ms"].items():
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (name, batch_size, stats)
            assert stats["throughput"] == pytest.approx(int(batch_size) / (stats["mean"] / 1e3))


def test_best_delivery_chooses_among_fp32_static_and_qat():
    from kdpipe.stages.validate import choose_delivery

    def model(accuracy, p50_bs1, p50_bs64):
        return {"accuracy": accuracy, "latency_ms": {1: {"p50": p50_bs1}, 64: {"p50": p50_bs64}}}

    fp32 = model(0.97, 0.02, 0.10)
    passing, failing = [("accuracy_min", 0.97, 0.9, True)], [("accuracy_min", 0.85, 0.9, False)]
    lossy_static, good_qat = model(0.95, 0.01, 0.05), model(0.968, 0.01, 0.05)
    chosen, why = choose_delivery("best", fp32, lossy_static, passing, 0.01, good_qat, passing)
    assert chosen == "qat" and "INT8 loses 0.0200 accuracy" in why, why
    # Both qualify: the more accurate wins, then the faster at the smallest batch size.
    assert choose_delivery("best", fp32, model(0.969, 0.01, 0.05), passing, 0.01, good_qat, passing)[0] == "int8"
    assert choose_delivery("best", fp32, good_qat, passing, 0.01, model(0.968, 0.009, 0.05), passing)[0] == "qat"
    assert choose_delivery("best", fp32, lossy_static, passing, 0.01, good_qat, failing) == (
        "fp32", "INT8 loses 0.0200 accuracy, more than int8_max_accuracy_drop 0.01; QAT INT8 fails gate accuracy_min")
    assert choose_delivery("best", fp32, None, (), 0.01, model(0.97, 0.03, 0.05), passing) == (
        "fp32", "QAT INT8 is not faster than FP32 at batch size 1 (p50)")
    assert choose_delivery("int8", fp32, lossy_static, passing, 0.01, good_qat, passing)[0] == "qat"
    assert choose_delivery("fp32", fp32, lossy_static, passing, 0.01, good_qat, passing)[0] == "fp32"


@pytest.mark.slow
def test_sigkill_during_qat_then_resume(workdir):
    """A real process killed (SIGKILL) in the QAT phase; `kdpipe run --resume` continues QAT from its checkpoint."""
    epochs = 6
    overrides = sets(*FAST, *LENIENT, "export.quantize=qat", f"export.qat_epochs={epochs}")
    proc = start_run("run", PIPELINES / "digits.yaml", *overrides)
    seen = read_until(proc, "qat epoch 2/")
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert proc.returncode == -9, "".join(seen)
    (run_dir,) = (workdir / "runs" / "digits").iterdir()
    assert json.loads((run_dir / "ledger.json").read_text())["finished"] == ["teacher", "distill"]
    assert not (run_dir / "report.json").exists() and not (run_dir / "student.qat.onnx").exists()
    assert torch.load(run_dir / "checkpoints" / "qat" / "0-qat.pt", weights_only=True)["epoch"] >= 1

    resumed = run_process("run", "--resume", run_dir, env=ONE_THREAD)
    assert resumed.returncode in (0, 1), resumed.stderr
    report = read_report(resumed.stdout)
    assert report["resumed"] == 1 and report["status"] in ("passed", "failed")
    assert "qat epoch 1/" not in resumed.stderr  # continued from the checkpoint, not restarted
    assert f"qat epoch {epochs}/{epochs}" in resumed.stderr and "student epoch" not in resumed.stderr
    qat = report["quantization"]["qat"]
    assert qat["parity"]["agreement"] >= 0.99 and 0.5 < qat["accuracy"] <= 1
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(qat["path"]).graph.node}


FLEXIBLE = '''
from torch import nn


class Flexible(nn.Module):
    """Takes flat or image batches: it branches on the input's rank, which torch.fx cannot trace."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        if x.dim() > 2:
            x = x.flatten(1)
        return self.fc(x)


def flexible(num_classes):
    return Flexible(num_classes)
'''


def assert_one_line(result, file, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{file}: export.quantize: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_qat_with_a_student_fx_cannot_trace_exits_2(workdir):
    (workdir / "flexible.py").write_text(FLEXIBLE)
    file = write_pipeline(workdir / "p.yaml", **{"student.model": {"entrypoint": "flexible.py:flexible"},
                                                  "export.quantize": "qat"})
    for command in ("check", "run"):
        assert_one_line(cli(command, file, *sets(*FAST)), file, "qat needs a student torch.fx can trace",
                        "Flexible cannot be traced", "use static")
    assert not (workdir / "runs").exists()  # refused before any run started
    # The same student is fine without QAT.
    assert cli("check", file, "--set", "export.quantize=static").exit_code == 0


TRAINING_BRANCH = '''
from torch import nn


class TrainingBranch(nn.Module):
    """Scales its features only while training: torch.fx traces the branch once, as it stands at trace time."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        if self.training:
            x = x * 2
        return self.fc(x)


def training_branch(num_classes):
    return TrainingBranch(num_classes)
'''


def test_qat_with_a_student_whose_trace_differs_in_eval_mode_exits_2(workdir):
    (workdir / "branch.py").write_text(TRAINING_BRANCH)
    file = write_pipeline(workdir / "p.yaml", **{"student.model": {"entrypoint": "branch.py:training_branch"},
                                                  "export.quantize": "qat"})
    assert_one_line(cli("check", file, *sets(*FAST)), file, "TrainingBranch's trace differs from it in eval mode",
                    "self.training", "use static")


SCALED_RELU = '''
import torch
from torch import nn


class ScaledReLU(nn.Module):
    """A convolution scaled by a constant before its ReLU: torch's QAT makes the two one quantized::mul_relu."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 8, 3, padding=1)
        self.register_buffer("scale", torch.full((1, 8, 1, 1), 2.0))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x) * self.scale).mean((2, 3)))
'''


def test_qat_with_a_student_whose_int8_model_has_no_onnx_export_exits_2_before_training(workdir):
    """torch converts it, then its ONNX exporter refuses quantized::mul_relu: found by `kdpipe check`, not in the
    export stage after distillation, and without the exporter's dump of the whole graph on stdout."""
    (workdir / "scaled.py").write_text(SCALED_RELU)
    file = write_pipeline(workdir / "p.yaml", **{"student.model": {"entrypoint": "scaled.py:ScaledReLU"},
                                                  "export.quantize": "qat"})
    checked = run_process("check", file, cwd=workdir)
    assert checked.returncode == 2 and checked.stdout == "", checked.stdout[:500]
    [line] = checked.stderr.strip().splitlines()
    assert line.startswith(f"{file}: export.quantize: qat's INT8 model of ScaledReLU cannot be exported to ONNX "
                           f"(UnsupportedOperatorError: "), line
    assert "quantized::mul_relu" in line and line.endswith("; use static")
    assert_one_line(cli("run", file, *sets(*FAST)), file, "cannot be exported to ONNX")
    assert not (workdir / "runs").exists()  # refused before any run started
    assert cli("check", file, "--set", "export.quantize=static").exit_code == 0


def test_timm_batchnorm_act_students_are_fused_and_their_qdq_model_follows_the_fake_quantized_one(tmp_path):
    """timm's mobile students normalize with BatchNormAct2d, whose forward branches on self.training: traced as it
    is, the eval-mode QAT model kept batch statistics (predictions 69% equal to its own ONNX model, BN unfused)."""
    timm = pytest.importorskip("timm")  # the vision extra; scripts/test.sh installs it
    from kdpipe.onnx_runtime import predict as ort_predict, session
    from kdpipe.qat import calibrate, export_qdq, fake_quantize, freeze

    torch.manual_seed(0)
    student = timm.create_model("lcnet_050", pretrained=False, num_classes=10)
    x = torch.randn(256, 3, 32, 32)
    with torch.no_grad():  # running statistics unlike the initial 0 / 1, so batch and running statistics differ
        for batch in x.split(64):
            student(batch)
    student.eval()
    fake_quantized = fake_quantize(student, x[:2], weight_bits=7)
    assert not any(isinstance(m, timm.layers.BatchNormAct2d) for m in fake_quantized.modules())
    calibrate(fake_quantized, [b.numpy() for b in x.split(64)], torch.device("cpu"))
    fake_quantized = freeze(fake_quantized)
    export_qdq(fake_quantized, x[:2], tmp_path / "qat.onnx", opset=18, dynamic_batch=True)
    ops = {node.op_type for node in onnx.load(tmp_path / "qat.onnx").graph.node}
    assert "BatchNormalization" not in ops and "QuantizeLinear" in ops  # BN folded into the INT8 convolutions
    with torch.no_grad():
        expected, fp32 = fake_quantized(x).numpy(), student(x).numpy()
    got = ort_predict(session(tmp_path / "qat.onnx"), x.numpy())
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert (expected.argmax(1) == fp32.argmax(1)).mean() >= 0.9  # and the fake-quantized model follows the student


def test_qat_with_a_feature_method_exits_2(workdir):
    file = write_pipeline(workdir / "p.yaml", **{"export.quantize": "qat", "distill.method": "at",
                                                  "distill.params": {}})
    assert_one_line(cli("check", file), file, "method 'at''s loss", "taps student features")
