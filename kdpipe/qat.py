"""Quantization-aware distillation: the distilled student, fake-quantized, fine-tuned against the teacher, as QDQ ONNX.

Fake quantization comes from torch's own `torch.ao.quantization` in FX graph mode: `prepare_qat_fx` traces the
student, fuses conv-BN(-ReLU) and inserts FakeQuantize modules (INT8 per-channel symmetric weights, 8-bit affine
activations, moving-average min/max observers), which are calibrated on training batches before the fine-tuning.
The fine-tuning is one more phase of the one training loop, on the method's own loss against the frozen teacher,
in fp32 (autocast off: the fake-quantize kernels take float32). `convert_fx` then folds BN into the convolutions
and fixes the INT8 weights, and torch's TorchScript ONNX exporter writes each quantize/dequantize as a
QuantizeLinear/DequantizeLinear pair, the QDQ format onnxruntime fuses into INT8 kernels. (torch.export, behind
the dynamo exporter, cannot trace FakeQuantize: its forward branches on buffer values.)

The student must be traceable by torch.fx (no Python control flow on tensor values or shapes); `check_quantizable`
says so before a run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdpipe.atomic import atomic_write
from kdpipe.errors import InputError
from kdpipe.onnx_export import native_stdout_discarded, quiet_exporter

KEY = "export.quantize"
QUANTIZATION_KEY = "kdpipe.quantization"  # ONNX metadata_props: none | dynamic | static | qat


def qconfig_mapping(weight_bits: int):
    """INT8 per-channel symmetric weights, per-tensor affine uint8 activations, moving-average min/max observers.

    Weights use [-64, 63] with weight_bits 7 (export.int8_weight_bits: what x86 CPUs without VNNI compute
    exactly), else [-128, 127], ONNX's int8 range (the exporter refuses the narrower [-127, 127])."""
    from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    low, high = {7: (-64, 63), 8: (-128, 127)}[weight_bits]
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=low, quant_max=high,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def fake_quantize(student: nn.Module, example: torch.Tensor, weight_bits: int) -> nn.Module:
    """A fake-quantized copy of `student` on the CPU, in training mode, observers not yet calibrated.
    Raises InputError naming export.quantize when torch.fx cannot trace the student."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = plain_batchnorms(copy.deepcopy(student).cpu())
    probe = torch.randn((4, *example.shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(probe)
    try:
        with quiet_exporter():
            prepared = prepare_qat_fx(model.train(), qconfig_mapping(weight_bits), (example.cpu(),))
    except Exception as exc:  # noqa: BLE001 - the tracer raises many types (TraceError, TypeError, NotImplementedError)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(KEY, f"qat needs a student torch.fx can trace, and {type(student).__name__} cannot be "
                              f"traced ({type(exc).__name__}: {first}); use static") from None
    difference = _eval_difference(prepared, probe, expected)
    if difference > 1e-3 * max(1.0, expected.abs().max().item()):
        raise InputError(KEY, f"qat needs a student whose torch.fx trace computes what it does, and "
                              f"{type(student).__name__}'s trace differs from it in eval mode by up to {difference:.3g} "
                              "(a branch on self.training or on tensor values, fixed at trace time); use static")
    return prepared


def plain_batchnorms(model: nn.Module) -> nn.Module:
    """`model` with each BatchNorm2d subclass that applies its own activation (timm's BatchNormAct2d) replaced by
    nn.BatchNorm2d followed by that dropout and activation, in place.

    torch.fx would trace such a forward's branches on self.training once, in training mode (batch statistics in
    eval too), and conv-BN fusion only matches nn.BatchNorm2d."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d or not isinstance(module, nn.BatchNorm2d) or not hasattr(module, "act"):
            continue
        norm = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        norm.load_state_dict({k: v for k, v in module.state_dict().items() if "." not in k})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                nn.Sequential(norm, getattr(module, "drop", nn.Identity()), module.act))
    return model


@torch.no_grad()
def _eval_difference(prepared: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference between the traced model in eval mode, quantization off, and the student's output;
    leaves `prepared` in training mode with quantization on, as prepare_qat_fx made it."""
    from torch.ao.quantization import disable_fake_quant, disable_observer, enable_fake_quant, enable_observer

    prepared.apply(disable_fake_quant)
    prepared.apply(disable_observer)
    got = prepared.eval()(x)
    prepared.apply(enable_fake_quant)
    prepared.apply(enable_observer)
    prepared.train()
    return (got - expected).abs().max().item()


def qat_method(pipeline, fake_quantized: nn.Module, teacher: nn.Module | None, num_classes: int,
               input_shape: tuple[int, ...]):
    """The pipeline's method around the fake-quantized student; InputError when its loss cannot fine-tune it."""
    from kdpipe.methods import Method, get_method

    cls = get_method(pipeline.distill.method)
    why = None
    method = None
    if cls.loss is Method.loss:
        why = "it trains several networks (peers, generations), not the student on one loss"
    else:
        try:
            method = cls(pipeline.distill.params, student=fake_quantized, teacher=teacher, num_classes=num_classes,
                         input_shape=input_shape, taps=pipeline.distill.taps)
        except InputError:
            why = "its loss taps student features by module path, which the traced, fused graph does not keep"
        else:
            if method.student_taps():
                why = "its loss taps student features by module path, which the traced, fused graph does not keep"
            elif method.extra_modules() is not None:
                why = "its loss depends on modules it trains beside the student"
    if why is not None:
        raise InputError(KEY, f"qat fine-tunes the student with method '{cls.name}''s loss, but {why}; "
                              "use static, or a method whose loss reads logits (kd, none)")
    return method


def check_quantizable(pipeline, student: nn.Module, teacher: nn.Module | None, num_classes: int,
                      input_shape: tuple[int, ...]) -> None:
    """Before a run starts: the student traces, the method's loss can fine-tune it, and its INT8 graph exports to
    ONNX (else InputError)."""
    from kdpipe import distributed

    if distributed.from_environment().enabled:
        raise InputError(KEY, "qat fine-tunes in the export stage, which runs on rank 0 alone; run it without torchrun")
    example = torch.zeros((2, *input_shape))
    fake_quantized = fake_quantize(student, example, pipeline.export.int8_weight_bits)
    qat_method(pipeline, fake_quantized, teacher, num_classes, input_shape)
    # torch converts some fused patterns to quantized ops the ONNX exporter lacks (a Mul followed by a ReLU becomes
    # quantized::mul_relu): found now, not in the export stage after the whole distillation.
    calibrate(fake_quantized, [example.numpy()], torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp, native_stdout_discarded():
        try:
            export_qdq(fake_quantized, example, Path(tmp) / "qat.onnx", pipeline.export.opset,
                       pipeline.export.dynamic_batch)
        except Exception as exc:  # noqa: BLE001 - convert_fx and the exporter raise many types
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise InputError(KEY, f"qat's INT8 model of {type(student).__name__} cannot be exported to ONNX "
                                  f"({type(exc).__name__}: {first}); use static") from None


@torch.no_grad()
def calibrate(fake_quantized: nn.Module, batches: list[np.ndarray], device: torch.device) -> None:
    """Set the observers' ranges from training batches (fake quantization off meanwhile), in eval mode so that
    BatchNorm statistics stay those of the distilled student."""
    from torch.ao.quantization import disable_fake_quant, enable_fake_quant, enable_observer

    fake_quantized.eval()
    fake_quantized.apply(disable_fake_quant)
    fake_quantized.apply(enable_observer)
    for batch in batches:
        fake_quantized(torch.from_numpy(batch).to(device))
    fake_quantized.apply(enable_fake_quant)


def freeze(fake_quantized: nn.Module) -> nn.Module:
    """Eval mode with the observers off: the model that the QDQ export reproduces."""
    from torch.ao.quantization import disable_observer

    fake_quantized.eval()
    fake_quantized.apply(disable_observer)
    return fake_quantized


def export_qdq(fake_quantized: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
               wrap: Callable[[nn.Module], nn.Module] = lambda model: model) -> None:
    """The fine-tuned model as QDQ ONNX (input `input`, output `logits`, like the FP32 export), written atomically;
    `wrap` puts the converted model in what the graph exports (an InputAdapter for `export.input: uint8`)."""
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with quiet_exporter(), atomic_write(path) as tmp:
        converted = wrap(convert_within_ranges(freeze(copy.deepcopy(fake_quantized).cpu())))
        torch.onnx.export(converted, (example.cpu(),), str(tmp), input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamic_axes=dynamic, dynamo=False)


def convert_within_ranges(fake_quantized: nn.Module) -> nn.Module:
    """The quantized model of `fake_quantized` (convert_fx, which consumes it), each INT8 weight clamped to its
    fake quantizer's [quant_min, quant_max].

    The fake-quantized model clamps its weights there in every forward; convert_fx rounds them with the same scales
    but clamps to int8's [-128, 127] only, so weights that fine-tuning moved past the observers' moving-average range
    would export larger than the model that was trained and measured (with export.int8_weight_bits 7: up to 67
    for a range of [-64, 63], which is also what x86 CPUs without VNNI cannot sum exactly)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    ranges = {name: (m.weight_fake_quant.quant_min, m.weight_fake_quant.quant_max)
              for name, m in fake_quantized.named_modules() if hasattr(m, "weight_fake_quant")}
    converted = convert_fx(fake_quantized)
    for name, module in converted.named_modules():
        if name not in ranges or not callable(getattr(module, "weight", None)):
            continue
        weight, (low, high) = module.weight(), ranges[name]
        if weight.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
            continue
        clamped = torch._make_per_channel_quantized_tensor(
            weight.int_repr().clamp(low, high), weight.q_per_channel_scales(), weight.q_per_channel_zero_points(),
            weight.q_per_channel_axis())
        module.set_weight_bias(clamped, module.bias())
    return converted


def prediction_parity(model: nn.Module, onnx_path: Path, x: torch.Tensor, against: str) -> dict:
    """How closely an INT8 ONNX model follows a PyTorch model on `x`: the share of samples with the same predicted
    class, and the largest absolute logit difference."""
    from kdpipe.inference import predict
    from kdpipe.onnx_runtime import logit_parity, predict as ort_predict, session

    expected = predict(model.cpu(), x.cpu()).logits.numpy()
    return {"against": against, **logit_parity(ort_predict(session(onnx_path), x.cpu().numpy()), expected)}


def fine_tune(pipeline, student: nn.Module, teacher: nn.Module | None, data, calibration: list[np.ndarray],
              settings, on_epoch) -> tuple[nn.Module, object]:
    """Fake-quantize `student`, calibrate it on `calibration`, and train it for export.qat_epochs with the method's
    loss against the teacher, as a phase of the one training loop (checkpointed per epoch as `settings`, a
    TrainerSettings, say, so a killed run resumes it). Returns the frozen fake-quantized model and the trainer."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    from kdpipe.train import Phase, Trainer

    device = data.y_train.device
    fake_quantized = fake_quantize(student, torch.from_numpy(calibration[0][:2]),
                                   pipeline.export.int8_weight_bits).to(device)
    method = qat_method(pipeline, fake_quantized, teacher, data.num_classes, data.input_shape)
    calibrate(fake_quantized, calibration, device)
    cfg = pipeline.export
    # BatchNorm follows batch statistics for the first third of the epochs (at least one), then its running
    # statistics are frozen and folded into the fake-quantized weights as the export folds them (the batch-norm
    # folding with freezing of Jacob et al. 2018 and Krishnamoorthi 2018): frozen from the start, a small student's
    # first steps can diverge.
    bn_epochs = max(1, cfg.qat_epochs // 3)

    def freeze_after_bn_epochs(epoch: int) -> None:
        if epoch > bn_epochs:
            fake_quantized.apply(freeze_bn_stats)

    optimizer = pipeline.distill.optimizer
    optimizer = optimizer.model_copy(update={"lr": cfg.qat_lr or optimizer.lr / 10})
    # fp32: torch's fake-quantize kernels take float32 tensors; torch.compile would trace the observers away; an
    # EMA would average the observers' ranges and the frozen BatchNorm statistics as if they were weights.
    settings = dataclasses.replace(settings, precision="fp32", compile=False, ema_decay=None, ema_export=False)
    trainer = Trainer(data, epochs=cfg.qat_epochs, batch_size=pipeline.data.batch_size, optimizer=optimizer,
                      seed=pipeline.training_seed, on_epoch=on_epoch, settings=settings)
    trainer.run([Phase("qat", [method.student_update(trainer, "qat")], cfg.qat_epochs,
                       evaluate={"qat": fake_quantized}, before_epoch=freeze_after_bn_epochs)])
    return freeze(fake_quantized), trainer
