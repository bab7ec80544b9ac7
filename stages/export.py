"""export: torch → one self-contained ONNX file, parity-checked against PyTorch on validation inputs."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdpipe.onnx_runtime import predict, session


class OnnxInterface(nn.Module):
    """Fixes the graph's input name to `input` and its output to `logits`, whatever the model's forward names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input):  # noqa: A002 - the ONNX input's name
        return self.model(input)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool) -> None:
    model = OnnxInterface(model).eval().cpu()
    dynamic = {"input": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    # The exporter prints progress and deprecation chatter; kdpipe reports the outcome itself.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example.cpu(),), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamic_shapes=dynamic, dynamo=True, external_data=False)
    finally:
        exporter_log.setLevel(level)


def parity(model: nn.Module, onnx_path: Path, x_val: torch.Tensor, batch_sizes: list[int]) -> dict[int, float]:
    """Max abs difference between PyTorch and onnxruntime logits per batch size, on real validation inputs."""
    sess = session(onnx_path, ["CPUExecutionProvider"])
    model = model.eval().cpu()
    diffs = {}
    for b in batch_sizes:
        x = x_val[:b].cpu()
        with torch.no_grad():
            expected = model(x).numpy()
        diffs[b] = float(np.abs(predict(sess, x.numpy(), batch_size=b) - expected).max())
    return diffs


def run(ctx) -> None:
    cfg = ctx.pipeline.export
    path = ctx.run_dir / "student.onnx"
    x_val = ctx.data.x_val
    example = x_val[: min(2, len(x_val))] if len(x_val) > 1 else x_val.repeat(2, *[1] * (x_val.ndim - 1))
    student = ctx.student.to("cpu")
    export_onnx(student, example, path, cfg.opset, cfg.dynamic_batch)
    batch_sizes = sorted({1, 2, len(x_val)}) if cfg.dynamic_batch else [len(example)]
    diffs = parity(student, path, x_val, batch_sizes)
    ctx.student = student.to(ctx.device)
    worst = max(diffs.values())
    ctx.add_gate("parity_max_abs_diff", worst, cfg.atol, worst <= cfg.atol)
    ctx.artifacts["onnx_path"] = path
    ctx.report["onnx"] = {"path": str(path), "opset": cfg.opset, "size_bytes": path.stat().st_size,
                          "dynamic_batch": cfg.dynamic_batch, "parity_max_abs_diff": worst,
                          "parity_by_batch_size": {str(b): d for b, d in diffs.items()}}
