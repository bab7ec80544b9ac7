"""validate: onnxruntime accuracy on the test split, latency percentiles per batch size, and the gates."""

from __future__ import annotations

import time

import numpy as np

from kdpipe.onnx_runtime import available_providers, predict, session


def measure_latency(sess, x: np.ndarray, batch_size: int, warmup: int, runs: int) -> dict[str, float]:
    """Per-call latency in ms (p50/p90/p99/mean) and throughput in samples/s for one batch size."""
    reps = -(-batch_size // len(x))
    batch = np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size])
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: batch})
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: batch})
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
            "throughput": float(batch_size / times.mean()), "runs": runs}


def latency_limits(limit, batch_sizes: list[int]) -> dict[int, float]:
    """A number applies to the smallest batch size; a mapping names its batch sizes."""
    if limit is None:
        return {}
    if isinstance(limit, dict):
        return {int(b): float(v) for b, v in limit.items()}
    return {min(batch_sizes): float(limit)}


def run(ctx) -> None:
    cfg = ctx.pipeline.validation
    providers, dropped = available_providers(cfg.providers)
    for p in dropped:
        ctx.progress.info(f"  warning: {p} is not available in this onnxruntime; using {', '.join(providers)}")
    sess = session(ctx.artifacts["onnx_path"], providers, cfg.threads)
    x_test = ctx.data.x_test.cpu().numpy()
    y_test = ctx.data.y_test.cpu().numpy()
    acc = float((predict(sess, x_test).argmax(1) == y_test).mean())
    latency = {b: measure_latency(sess, x_test, b, cfg.warmup, cfg.runs) for b in cfg.batch_sizes}

    ctx.report["student"]["accuracy"] = acc
    ctx.report["latency_ms"] = {str(b): v for b, v in latency.items()}
    ctx.report["validate"] = {"providers_requested": cfg.providers, "providers_used": sess.get_providers(),
                              "providers_dropped": dropped}
    ctx.tracker.log_metrics({"student/test_accuracy": acc,
                             **{f"latency_ms/p50_bs{b}": v["p50"] for b, v in latency.items()},
                             **{f"throughput/bs{b}": v["throughput"] for b, v in latency.items()}})

    gates = cfg.gates
    if gates.accuracy_min is not None:
        ctx.add_gate("accuracy_min", acc, gates.accuracy_min, acc >= gates.accuracy_min)
    teacher = ctx.report.get("teacher")
    if gates.max_accuracy_drop_vs_teacher is not None and teacher:
        drop = teacher["accuracy"] - acc
        ctx.add_gate("max_accuracy_drop_vs_teacher", drop, gates.max_accuracy_drop_vs_teacher,
                     drop <= gates.max_accuracy_drop_vs_teacher)
    for b, limit in latency_limits(gates.latency_p50_ms_max, cfg.batch_sizes).items():
        value = latency[b]["p50"] if b in latency else None
        ctx.add_gate(f"latency_p50_ms_max:bs{b}", value, limit, value is not None and value <= limit)
