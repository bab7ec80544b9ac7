"""OpenVINO, validate's second runtime (`validate.runtimes`): an ONNX file read by OpenVINO's ONNX frontend,
compiled for the CPU with settings derived from validate's, and measured on the inputs onnxruntime is measured on,
timed the same way (kdpipe.onnx_runtime.time_calls, latency_stats)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from kdpipe.onnx_runtime import check_batch_sizes, latency_stats, logit_parity, tile_batch, time_calls

MISSING_OPENVINO = "openvino is not installed: pip install 'kdpipe[openvino]'"
DEVICE = "CPU"
ACCURACY_BATCH = 512  # the batch accuracy is computed in, as kdpipe.onnx_runtime.predict does


class CannotRun(RuntimeError):
    """OpenVINO cannot read or compile a model (one onnxruntime runs): a finding about that model on this runtime.
    The message is OpenVINO's reason, its last line."""


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise RuntimeError(MISSING_OPENVINO) from None
    return openvino


def compile_settings(cfg) -> dict[str, str | int]:
    """OpenVINO's properties for a ValidateConfig: its threads (0: OpenVINO's default), one request at a time
    (validate times calls one after another), and f32 arithmetic: on a CPU with bf16 the plugin's default runs FP32
    models in bf16 (on an AMD EPYC the digits students' logits moved by up to 0.17 instead of 4e-6, and a test
    prediction changed). inter_op_threads and graph_optimization are onnxruntime's own and have no counterpart."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
            **({"INFERENCE_NUM_THREADS": cfg.threads} if cfg.threads else {})}


def settings_of(compiled) -> dict[str, str | int]:
    """The settings a compiled model runs with, read back from it (threads: those it uses, the default resolved)."""
    return {"threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "streams": int(compiled.get_property("NUM_STREAMS"))}


def compile_for_batch(core, model, batch_size: int, cfg):
    """The model compiled for one static batch size: static shapes are OpenVINO's fast path (a dynamic batch
    compiles kernels that are prepared again for each new shape), and each batch size is timed on its own anyway.
    Raises CannotRun."""
    shape = model.inputs[0].get_partial_shape()
    shape[0] = batch_size
    with cannot_run():
        model.reshape(shape)
        return core.compile_model(model, DEVICE, compile_settings(cfg))


@contextlib.contextmanager
def cannot_run():
    """OpenVINO's errors reading or compiling a model as CannotRun: its messages nest the reason in several lines
    of source locations ("Exception from src/…"), the reason last."""
    try:
        yield
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CannotRun(lines[-1].lstrip("- ") if lines else type(exc).__name__) from exc


def logits_of(compiled, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits over `x` from a model compiled for `batch_size`; the last chunk is padded and trimmed back."""
    request = compiled.create_infer_request()
    output = compiled.output(0)
    chunks = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        chunks.append(request.infer(tile_batch(chunk, batch_size))[output][:len(chunk)])
    return np.concatenate(chunks)


def measure_openvino(path: Path, cfg, x: np.ndarray, y: np.ndarray, reference: np.ndarray) -> dict:
    """Accuracy, latency per validate.batch_size, size and the settings read back, for one ONNX file in OpenVINO on
    the CPU, and its parity with `reference`, onnxruntime's logits on `x`. A fixed-batch model is refused where
    validate.batch_sizes asks for another batch size, as kdpipe.deploy.measure_model refuses it. Raises CannotRun
    where OpenVINO cannot read or compile it."""
    ov = import_openvino()
    core = ov.Core()
    with cannot_run():
        model = core.read_model(str(path))
    first = model.inputs[0].get_partial_shape()[0]
    fixed = first.get_length() if first.is_static else None
    check_batch_sizes(path, fixed, cfg.batch_sizes)
    step = fixed or min(ACCURACY_BATCH, len(x))
    compiled = compile_for_batch(core, model, step, cfg)
    logits = logits_of(compiled, x, step)
    latency = {}
    for b in cfg.batch_sizes:
        request = compile_for_batch(core, model, b, cfg).create_infer_request()
        batch = tile_batch(x, b)
        # share_inputs: the batch is read where it lies, as onnxruntime reads a numpy input; the logits are copied
        # out on every call, as onnxruntime returns them.
        latency[b] = latency_stats(time_calls(lambda: request.infer(batch, share_inputs=True), cfg.warmup, cfg.runs,
                                              cfg.budget_s), b)
    return {
        "path": str(path),
        "accuracy": float((logits.argmax(1) == y).mean()),
        "latency_ms": latency,
        "size_bytes": path.stat().st_size,
        "parity_vs_onnxruntime": logit_parity(logits, reference),
        "runtime": "openvino",
        "version": ov.get_version(),
        "device": DEVICE,
        "settings": settings_of(compiled),
    }
