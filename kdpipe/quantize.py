"""INT8 models from an FP32 ONNX file with onnxruntime's quantization tools.

Static quantization calibrates activation ranges on batches of the training
split and writes QDQ nodes (the format onnxruntime's CPU kernels fuse for conv
nets); dynamic quantization stores INT8 weights and computes activation ranges
per call, which needs no calibration data.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from kdpipe.atomic import atomic_write


class QuantizationFailed(RuntimeError):
    """onnxruntime's tools could not build the INT8 model; the message names the step and the cause."""


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._feeds = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def quantize(fp32_path: Path, int8_path: Path, mode: str, calibration: list[np.ndarray] | None = None,
             method: str = "minmax", percentile: float = 99.999, nodes_to_exclude: list[str] | None = None,
             nodes_to_quantize: list[str] | None = None, weight_bits: int = 7) -> str:
    """Write the INT8 version of `fp32_path`; `mode` is dynamic or static (static needs `calibration`, and sets
    activation ranges by `method`: minmax, or percentile keeping `percentile` of |x|). `nodes_to_exclude` stay in
    float; `nodes_to_quantize`, when given, are the only nodes quantized. Both name nodes of the pre-processed
    graph, which the quantizer is given (quantizable_nodes lists them). `weight_bits` 7 quantizes weights to
    [-64, 64] (onnxruntime's reduce_range), whose products with uint8 activations x86 CPUs without VNNI sum in
    16 bits without saturating; 8 to int8's full range.

    Returns how the model was pre-processed; raises QuantizationFailed when no INT8 model could be built."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from kdpipe.onnx_runtime import session

    reduce_range = {7: True, 8: False}[weight_bits]
    with _quiet_tools(), tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        pre_process = _pre_process(fp32_path, prepared)
        try:
            with atomic_write(int8_path) as out:  # a failed build leaves no INT8 file that looks complete
                if mode == "dynamic":
                    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, reduce_range=reduce_range,
                                     nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude)
                else:
                    if not calibration:
                        raise ValueError("static quantization needs calibration batches")
                    graph_input = session(fp32_path).get_inputs()[0]
                    input_name = graph_input.name
                    dtype = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}.get(graph_input.type)
                    if dtype is not None and any(b.dtype != dtype for b in calibration):
                        raise ValueError(f"calibration batches of {calibration[0].dtype} for an input of "
                                         f"{graph_input.type}")
                    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
                    quantize_static(str(prepared), str(out), _Batches(input_name, calibration),
                                    quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=methods[method], reduce_range=reduce_range,
                                    nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
                                    extra_options={"CalibPercentile": percentile})
        except Exception as exc:
            raise QuantizationFailed(f"{mode} quantization failed: {_describe(exc)}") from exc
        return pre_process


def quantizable_nodes(fp32_path: Path) -> dict[str, str]:
    """Name → op type of the nodes static quantization may quantize (those of an op type quantize_static
    quantizes by default: its QLinear and QDQ registries, Mul and Add included), in graph order, as named in the
    pre-processed graph that `quantize` hands the quantizer. Raises QuantizationFailed when the graph cannot be
    pre-processed."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with _quiet_tools(), tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _pre_process(fp32_path, prepared)
        graph = onnx.load(str(prepared)).graph
    quantized_types = set(QDQRegistry) | set(QLinearOpsRegistry)
    return {node.name: node.op_type for node in graph.node if node.op_type in quantized_types}


@contextlib.contextmanager
def _quiet_tools():
    """The tools log advice at WARNING for every model; kdpipe reports the outcome itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _pre_process(fp32_path: Path, prepared: Path) -> str:
    """Shape inference and graph folding of `fp32_path` into `prepared`, so that every tensor has the type info
    quantization needs; returns how it was done. Raises QuantizationFailed."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(prepared))
    except Exception as exc:
        # Symbolic shape inference asserts on some exporters' graphs (a Range node from torch 2.11);
        # ONNX's own shape inference is enough for the quantizer's type info.
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as retry_exc:
            raise QuantizationFailed(f"pre-processing failed, with and without symbolic shape inference: "
                                     f"{_describe(exc)}; {_describe(retry_exc)}") from retry_exc
        return f"ONNX shape inference only (symbolic shape inference failed: {_describe(exc)})"
    return "symbolic shape inference"


def _describe(exc: BaseException) -> str:
    """The exception's type and the first line of its message (onnxruntime's AssertionErrors have none)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
