"""torch → ONNX: one self-contained file with a dynamic batch dimension, input `input` and output `logits`."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from kdpipe import gc_tuning


class OnnxInterface(nn.Module):
    """Fixes the graph's input name to `input` and its output to `logits`, whatever the model's forward names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input):  # noqa: A002 - the ONNX input's name
        return self.model(input)


@contextlib.contextmanager
def quiet_exporter():
    """torch's exporters (and torch.ao) print progress, deprecations and advice on every call; kdpipe reports the
    outcome itself."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


@contextlib.contextmanager
def native_stdout_discarded():
    """Discard what native code writes to the process's stdout meanwhile: torch's TorchScript exporter writes the
    whole graph there (C++ std::cout, whatever sys.stdout is) when a node cannot be exported, and always turns its
    log on (torch.onnx's setup_onnx_logging tests the function `_jit_is_onnx_log_enabled`, not its result)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@functools.cache
def reuse_torchlib_ops() -> bool:
    """Let every export in this process share one list of onnxscript's torchlib operators.

    torch.onnx.export builds its operator registry on every call from onnxscript's `get_torchlib_ops`, which parses
    the source of each of ~500 functions again: 1.6 s of a small model's 5 s export on 2 cores, paid again by every
    search trial. The list depends only on the installed onnxscript, so it is computed once. Where torch or
    onnxscript lay this out differently, exports run as before (returns False)."""
    try:
        with gc_tuning.imports_uncollected():  # onnxscript and its operator list live as long as the process
            from torch.onnx._internal import _lazy_import

            apis = importlib.import_module(_lazy_import.onnxscript_apis._name)
            apis.get_torchlib_ops = functools.cache(apis.get_torchlib_ops)
            apis.get_torchlib_ops()
    except (ImportError, AttributeError):
        return False
    return True


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
                metadata: dict[str, str] | None = None) -> None:
    """Export `model` to `path`; `metadata` goes into the file's metadata_props (e.g. the input contract)."""
    model = OnnxInterface(model).eval().cpu()
    dynamic = {"input": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    reuse_torchlib_ops()
    with quiet_exporter():
        torch.onnx.export(model, (example.cpu(),), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamic_shapes=dynamic, dynamo=True, external_data=False)
    if metadata:
        add_metadata(path, metadata)


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set `metadata` in the ONNX file's metadata_props (keeping its other entries), rewriting it atomically."""
    import onnx

    from kdpipe.atomic import atomic_write

    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props}, **metadata})
    with atomic_write(path) as tmp:
        onnx.save(graph, str(tmp))


def takes_uint8(path: Path) -> bool:
    """Whether the ONNX model at `path` takes uint8 images (`export.input: uint8`) rather than float inputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
