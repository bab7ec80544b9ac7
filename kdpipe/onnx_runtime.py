"""onnxruntime sessions: provider selection with honest fallback reporting, and batched inference."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

MISSING_ORT = "onnxruntime is not installed: pip install 'kdpipe[cpu]' (or 'kdpipe[gpu]' on a CUDA machine)"


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError(MISSING_ORT) from None
    return onnxruntime


def available_providers(requested: list[str]) -> tuple[list[str], list[str]]:
    """(the requested providers this onnxruntime has, in order; those it lacks)."""
    have = set(import_ort().get_available_providers())
    kept = [p for p in requested if p in have]
    dropped = [p for p in requested if p not in have]
    return kept or ["CPUExecutionProvider"], dropped


def session(path: Path, providers: list[str], threads: int = 0):
    ort = import_ort()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def predict(sess, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
