"""onnxruntime sessions: session options, provider selection with honest fallback reporting, inference and latency."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from kdpipe.config import MIN_TIMED_RUNS
from kdpipe.errors import InputError

MISSING_ORT = "onnxruntime is not installed: pip install 'kdpipe[cpu]' (or 'kdpipe[gpu]' on a CUDA machine)"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
ON_GPU = (TENSORRT, CUDA)  # what `auto` takes where onnxruntime has it, in order, before the CPU; IO binding on both


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError(MISSING_ORT) from None
    return onnxruntime


def known_providers() -> list[str] | None:
    """Every provider name onnxruntime knows (built in or not); None without onnxruntime."""
    try:
        return import_ort().get_all_providers()
    except RuntimeError:
        return None


def resolve_providers(providers: str | list[str]) -> list[str]:
    """The providers a pipeline asks for: `auto` is auto_providers of this onnxruntime."""
    if providers != "auto":
        return list(providers)
    return auto_providers(import_ort().get_available_providers())


def auto_providers(available: list[str]) -> list[str]:
    """`providers: auto` given the providers an onnxruntime build has: TensorRT, then CUDA, where present (both with
    IO binding), the CPU last. onnxruntime falls back along the list where one cannot start (TensorRT without its
    libraries), and validate reports that fallback."""
    return [p for p in ON_GPU if p in available] + [CPU]


def missing_providers(providers: str | list[str]) -> list[str]:
    """The listed providers this onnxruntime lacks (none for `auto`, or without onnxruntime, which run reports)."""
    try:
        have = set(import_ort().get_available_providers())
    except RuntimeError:
        return []
    return [p for p in resolve_providers(providers) if p not in have]


def available_providers(requested: str | list[str]) -> tuple[list[str], list[str]]:
    """(the requested providers this onnxruntime has, in order; those it lacks)."""
    requested = resolve_providers(requested)
    have = set(import_ort().get_available_providers())
    kept = [p for p in requested if p in have]
    dropped = [p for p in requested if p not in have]
    return kept or [CPU], dropped


# validate.graph_optimization → onnxruntime's GraphOptimizationLevel
GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}


def session(path: Path, providers=(CPU,), threads: int = 0, inter_op_threads: int = 0, graph_optimization: str = "all"):
    """An inference session; `graph_optimization` is disable | basic | extended | all."""
    ort = import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
    options.log_severity_level = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def options_of(sess) -> dict:
    """The thread and graph-optimization settings a session was made with, read back from the session itself, in
    validate's terms (threads 0: onnxruntime's default)."""
    options = sess.get_session_options()
    level = {name: key for key, name in GRAPH_OPTIMIZATION.items()}[options.graph_optimization_level.name]
    return {"threads": options.intra_op_num_threads, "inter_op_threads": options.inter_op_num_threads,
            "graph_optimization": level}


def configured_session(path: Path, cfg):
    """A session with a ValidateConfig's settings (the requested providers this onnxruntime has, threads,
    graph optimization), so every model of a run is measured the same way."""
    providers, _ = available_providers(cfg.providers)
    return session(path, providers, cfg.threads, cfg.inter_op_threads, cfg.graph_optimization)


def fixed_batch_size(sess) -> int | None:
    """The batch size baked into the model's input, or None when the batch dimension is dynamic."""
    first = sess.get_inputs()[0].shape[0]
    return first if isinstance(first, int) else None


def check_batch_sizes(path: Path, fixed: int | None, batch_sizes: list[int]) -> None:
    """InputError unless validate.batch_sizes is the one batch size a fixed-batch model takes."""
    if fixed is not None and set(batch_sizes) != {fixed}:
        raise InputError("validate.batch_sizes", f"{path.name} has a fixed batch size {fixed}; set validate.batch_sizes to [{fixed}]")


def tile_batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """`batch_size` real samples: the first ones of `x`, repeated when `x` has fewer."""
    reps = -(-batch_size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size] if reps > 1 else x[:batch_size])


def predict(sess, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits over `x`; a model with a fixed batch size gets its last chunk padded and trimmed back."""
    name = sess.get_inputs()[0].name
    fixed = fixed_batch_size(sess)
    step = fixed or batch_size
    chunks = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        padded = tile_batch(chunk, fixed) if fixed and len(chunk) < fixed else chunk
        chunks.append(sess.run(None, {name: padded})[0][:len(chunk)])
    return np.concatenate(chunks)


def logit_parity(got: np.ndarray, expected: np.ndarray) -> dict[str, float | int]:
    """How closely logits follow reference logits of the same samples: the share of samples with the same
    predicted class, and the largest absolute logit difference."""
    return {"agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(got - expected).max()), "samples": len(got)}


def check_classifier(path: Path, input_shape: tuple[int, ...], num_classes: int, batch_sizes: list[int], key: str,
                     uint8_images: bool = False) -> None:
    """Raise InputError unless `path` is an ONNX model taking (batch, *input_shape) and giving (batch, classes):
    float32 inputs, or uint8 images where the data hold 8-bit images (`uint8_images`)."""
    if not Path(path).is_file():
        raise InputError(key, f"model file not found: {path}")
    try:
        sess = session(Path(path))
    except Exception as exc:  # onnxruntime raises several types for a file it cannot load
        raise InputError(key, f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
    inp = sess.get_inputs()[0]
    dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}.get(inp.type)
    if dtype is None or (dtype is np.uint8 and not uint8_images):
        expected = "a float32 or uint8 input" if uint8_images else "a float32 input"
        why = " (uint8 takes 8-bit images, and the data hold none)" if dtype is np.uint8 else ""
        raise InputError(key, f"expected {expected}, the model's '{inp.name}' is {inp.type}{why}")
    fixed = fixed_batch_size(sess)
    if fixed is not None and set(batch_sizes) != {fixed}:
        raise InputError("validate.batch_sizes", f"{path} has a fixed batch size {fixed}; set validate.batch_sizes to [{fixed}]")
    try:
        out = predict(sess, np.zeros((fixed or 1, *input_shape), dtype))
    except Exception as exc:
        raise InputError(key, f"the model does not take inputs of shape (batch, {', '.join(map(str, input_shape))}): "
                              f"{str(exc).splitlines()[0]}") from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise InputError(key, f"expected logits of shape (batch, {num_classes}), the model gives {out.shape}")


def latency_stats(seconds: np.ndarray, batch_size: int) -> dict[str, float]:
    """Per-call latency in ms (p50/p90/p99/mean) and throughput in samples/s, from per-call times in seconds."""
    ms = seconds * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
            "throughput": float(batch_size / seconds.mean()), "runs": len(seconds)}




def time_calls(call, warmup: int, runs: int, budget_s: float = float("inf")) -> np.ndarray:
    """Per-call seconds of up to `runs` timed calls after up to `warmup` untimed ones, all within `budget_s`
    (at least one warm-up and MIN_TIMED_RUNS timed calls are made whatever the budget)."""
    deadline = time.perf_counter() + budget_s
    for i in range(warmup):
        if i and time.perf_counter() >= deadline:
            break
        call()
    times = []
    while len(times) < runs and (len(times) < MIN_TIMED_RUNS or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return np.array(times)


def measure_latency(sess, x: np.ndarray, batch_size: int, warmup: int, runs: int,
                    budget_s: float = float("inf")) -> dict[str, float]:
    """Latency of one batch of real samples, within `budget_s` seconds (see time_calls). On CUDA (TensorRT too) the
    input and output stay on the device (IO binding), so what is timed is the model, not a host copy per call."""
    batch = tile_batch(x, batch_size)
    name = sess.get_inputs()[0].name
    if sess.get_providers()[0] in ON_GPU:
        ort = import_ort()
        binding = sess.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cuda", 0)
        binding.synchronize_inputs()
        stats = latency_stats(time_calls(lambda: sess.run_with_iobinding(binding), warmup, runs, budget_s), batch_size)
        return {**stats, "io_binding": True}
    return {**latency_stats(time_calls(lambda: sess.run(None, {name: batch}), warmup, runs, budget_s), batch_size),
            "io_binding": False}
