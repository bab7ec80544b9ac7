"""The deploy path: a student to the ONNX graph that ships (FP32, post-training INT8 or QAT INT8) and that graph
measured with onnxruntime. The run's export and validate stages and every search trial take it alike, so a trial is
scored on the graph the run would build (its `export.input`, its calibration) and measured with validate's session
settings and timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdpipe.models.adapter import for_export, graph_inputs, input_contract
from kdpipe.onnx_export import add_metadata, export_onnx, takes_uint8
from kdpipe.onnx_runtime import (check_batch_sizes, configured_session, fixed_batch_size, measure_latency, options_of,
                                 predict, tile_batch)
from kdpipe.qat import QUANTIZATION_KEY, export_qdq
from kdpipe.quantize import quantize


def example_inputs(data, graph_input: str) -> torch.Tensor:
    """Two validation samples as the graph takes them: a batch of one would let the exporter fix the batch to 1."""
    return torch.from_numpy(tile_batch(graph_inputs(data, "val", graph_input).cpu().numpy(), 2))


def export_student_graph(student: nn.Module, data, export_cfg, path: Path, graph_input: str) -> dict[str, str]:
    """The FP32 student as the graph `export.input` asks for; returns its input contract (also in its metadata)."""
    contract = input_contract(data, graph_input)
    export_onnx(for_export(student.cpu(), data, graph_input), example_inputs(data, graph_input), path,
                export_cfg.opset, export_cfg.dynamic_batch, {**contract, QUANTIZATION_KEY: "none"})
    return contract


def calibration_batches(data, export_cfg, batch_size: int, seed: int, graph_input: str = "float") -> list[np.ndarray]:
    """`export.calibration_batches` training batches (a fixed draw per seed) as the graph takes them: model-ready
    floats (QAT's calibration; static INT8 of a float graph), or the stored 8-bit images for a uint8 graph, whose
    uint8 input and Cast the quantizer leaves as they are."""
    return data.calibration_inputs(export_cfg.calibration_batches, batch_size, seed, stored=graph_input == "uint8")


def build_ptq(fp32_path: Path, int8_path: Path, mode: str, calibration: list[np.ndarray] | None, export_cfg) -> str:
    """Post-training INT8 (`mode`: dynamic, or static calibrated on `calibration` as calibration_batches gives it
    for the graph) of the FP32 graph, marked with its mode; returns how it was pre-processed. Raises
    QuantizationFailed."""
    pre_process = quantize(fp32_path, int8_path, mode, calibration, export_cfg.calibration_method,
                           export_cfg.calibration_percentile, weight_bits=export_cfg.int8_weight_bits)
    add_metadata(int8_path, {QUANTIZATION_KEY: mode})
    return pre_process


def export_qat_graph(fake_quantized: nn.Module, data, export_cfg, path: Path, graph_input: str) -> None:
    """The fine-tuned fake-quantized student (kdpipe.qat) as QDQ ONNX, taking what `export.input` asks for."""
    export_qdq(fake_quantized, example_inputs(data, graph_input), path, export_cfg.opset, export_cfg.dynamic_batch,
               wrap=lambda model: for_export(model, data, graph_input))
    add_metadata(path, {**input_contract(data, graph_input), QUANTIZATION_KEY: "qat"})


def inputs_for(path: Path, data, split: str = "test") -> np.ndarray:
    """`split` as the model at `path` takes it: the 8-bit images for a uint8 graph (`export.input: uint8`), else
    model-ready floats, so accuracy and latency are measured on what a caller of that graph feeds it."""
    return graph_inputs(data, split, "uint8" if takes_uint8(path) else "float").cpu().numpy()


def measure_model(path: Path, cfg, x: np.ndarray, y: np.ndarray, batch_sizes: list[int] | None = None,
                  keep_logits: bool = False) -> dict:
    """Accuracy, latency per batch size (validate.batch_sizes unless given), size, the providers in use, the
    session's settings as read back from it and each sample's prediction (`predictions`), for one ONNX file, in a
    session with validate's settings (kdpipe.onnx_runtime.configured_session). `keep_logits`: the logits too, for
    a second runtime to be compared with (N × classes floats, so only when asked)."""
    sess = configured_session(path, cfg)
    check_batch_sizes(path, fixed_batch_size(sess), cfg.batch_sizes)
    timed = cfg.batch_sizes if batch_sizes is None else batch_sizes
    logits = predict(sess, x)
    found = predictions(logits)
    return {
        "path": str(path),
        "accuracy": float((found["predicted"] == y).mean()),
        "latency_ms": {b: measure_latency(sess, x, b, cfg.warmup, cfg.runs, cfg.budget_s) for b in timed},
        "size_bytes": path.stat().st_size,
        "providers_used": sess.get_providers(),
        "session": options_of(sess),
        "predictions": found,
        **({"logits": logits} if keep_logits else {}),
    }


def predictions(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Each sample's predicted class and the softmax probability the model gives it (its confidence): what the
    run's report draws its confusion matrices and disagreements from (validate's `evaluation`)."""
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    predicted = logits.argmax(1)
    return {"predicted": predicted, "confidence": shifted[np.arange(len(logits)), predicted] / shifted.sum(1)}


def session_settings(cfg) -> dict:
    """The settings every measurement of a run is made with, as report.json (and each search trial) records them."""
    return {"threads": cfg.threads, "inter_op_threads": cfg.inter_op_threads,
            "graph_optimization": cfg.graph_optimization, "warmup": cfg.warmup, "runs": cfg.runs,
            "budget_s": cfg.budget_s}
