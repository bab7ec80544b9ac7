"""Static INT8 within an accuracy budget (`export.int8_budget`): mixed precision by keeping the nodes whose
quantization costs the most validation accuracy in float.

Full static INT8 is built first; when it loses more validation accuracy than the budget allows against the FP32
graph, each quantizable node is quantized alone to measure what it costs, and the costliest are kept in float, one
more at a time, until the loss is within the budget or `max_excluded_nodes` are kept. Both graphs run with
onnxruntime in validate's session settings (kdpipe.deploy.measure_model), on the validation split, so the choice
never sees the test split the delivered model is judged on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from kdpipe.deploy import measure_model
from kdpipe.quantize import quantizable_nodes, quantize


def fit_budget(fp32_path: Path, int8_path: Path, calibration: list[np.ndarray], export_cfg, x_val: np.ndarray,
               y_val: np.ndarray, validation_cfg) -> dict:
    """Write to `int8_path` the static INT8 version of `fp32_path` (calibrated on `calibration` with the export
    section's method) with the most sensitive nodes kept in float, as few as it takes for its validation accuracy
    (`x_val` as the graph takes it) to lose at most export_cfg.int8_budget.max_accuracy_drop against FP32, and at
    most max_excluded_nodes. When no tried build is within the budget, `int8_path` holds the one with the most
    nodes in float.

    Each tried build (full INT8, then one per excluded set) is timed at the smallest of validate.batch_sizes, with
    validate's warm-up, runs and budget (report `latency_batch_size`); the one-node sensitivity builds are measured
    for accuracy only. Returns report.json's quantization.budget, with how the graph was pre-processed
    (`pre_process`). Raises QuantizationFailed."""
    budget = export_cfg.int8_budget
    latency_batch_size = min(validation_cfg.batch_sizes)
    fp32_accuracy = measure_model(fp32_path, validation_cfg, x_val, y_val, batch_sizes=[])["accuracy"]

    def build(path: Path, timed: bool, excluded: list[str] | None = None,
              only: list[str] | None = None) -> tuple[str, dict]:
        pre_process = quantize(fp32_path, path, "static", calibration, export_cfg.calibration_method,
                               export_cfg.calibration_percentile, nodes_to_exclude=excluded, nodes_to_quantize=only,
                               weight_bits=export_cfg.int8_weight_bits)
        timed_sizes = [latency_batch_size] if timed else []
        return pre_process, measure_model(path, validation_cfg, x_val, y_val, batch_sizes=timed_sizes)

    def candidate(excluded: list[str]) -> tuple[str, dict]:
        pre_process, measured = build(int8_path, timed=True, excluded=excluded)
        return pre_process, {"excluded_nodes": excluded, "val_accuracy": measured["accuracy"],
                             "latency_p50_ms": measured["latency_ms"][latency_batch_size]["p50"]}

    pre_process, full = candidate([])
    candidates = [full]
    full_accuracy = full["val_accuracy"]
    sensitivity: dict[str, float] = {}
    if fp32_accuracy - full_accuracy > budget.max_accuracy_drop:
        with tempfile.TemporaryDirectory() as tmp:
            one_node = Path(tmp) / "one-node.int8.onnx"
            for node in quantizable_nodes(fp32_path):
                sensitivity[node] = fp32_accuracy - build(one_node, timed=False, only=[node])[1]["accuracy"]
        # Most sensitive first; sorted() is stable, so ties keep graph order.
        ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)[:budget.max_excluded_nodes]
        for count in range(1, len(ranked) + 1):
            candidates.append(candidate(ranked[:count])[1])
            if fp32_accuracy - candidates[-1]["val_accuracy"] <= budget.max_accuracy_drop:
                break
    final = candidates[-1]
    drop_after = fp32_accuracy - final["val_accuracy"]
    return {"budget": budget.model_dump(mode="json"), "fp32_val_accuracy": fp32_accuracy,
            "int8_val_accuracy_full": full_accuracy, "drop_before": fp32_accuracy - full_accuracy,
            "drop_after": drop_after, "excluded_nodes": final["excluded_nodes"], "sensitivity": sensitivity,
            "candidates": candidates, "latency_batch_size": latency_batch_size,
            "within_budget": drop_after <= budget.max_accuracy_drop, "pre_process": pre_process}
