"""Epoch time of distillation: cached teacher vs online teacher vs the student alone; DDP; GPU precision.

    .venv/bin/python benchmarks/speed.py [--epochs 10] [--repeats 3]

One run, same data (digits) and student (cnn width 8 depth 2); the teacher is a cnn
of width 64 and depth 4 (several hundred times the student's parameters; its
weights are random, which does not change its cost). Rows:

  none          the student alone on labels: the floor
  kd + cache    Hinton KD with the teacher's outputs computed once (kdpipe's default)
  kd online     Hinton KD running the teacher at every step (the naive loop)

"per epoch" is the median steady-state epoch; "with pass" spreads the one
teacher pass of the cached variant over the epochs of the run. Then 1 vs 2
processes (torchrun, gloo) on CPU, and fp32 vs bf16 when a GPU is present.
Variants are interleaved and repeated, and the fastest repeat is kept, because
other processes on a shared machine only ever add time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kdpipe import distributed
from kdpipe.config import DataConfig, ModelConfig, OptimizerConfig
from kdpipe.data import load_data
from kdpipe.methods import get_method
from kdpipe.models import build_model, count_params

TEACHER = ModelConfig(arch="cnn", width=64, depth=4)
STUDENT = ModelConfig(arch="cnn", width=8, depth=2)


def time_fit(method: str, epochs: int, device: str = "cpu", teacher_online: bool = False,
             precision: str = "fp32") -> dict[str, float]:
    """Train once; the median epoch time (epochs 2..), and the total wall time from the start of `fit`."""
    from kdpipe.train import Trainer

    data = load_data(DataConfig(), seed=0).to(torch.device(device))
    torch.manual_seed(0)
    teacher = build_model(TEACHER, "teacher", data.input_shape, data.num_classes).to(device)
    student = build_model(STUDENT, "student", data.input_shape, data.num_classes).to(device)
    stamps: list[float] = []

    def on_epoch(label, epoch, total, metrics):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    trainer = Trainer(data, epochs=epochs, batch_size=64, optimizer=OptimizerConfig(lr=0.05), seed=0,
                      on_epoch=on_epoch, teacher_online=teacher_online, precision=precision)
    cls = get_method(method)
    start = time.perf_counter()
    cls(cls.Params(), student=student, teacher=teacher if cls.needs_teacher else None, num_classes=data.num_classes,
        input_shape=data.input_shape).fit(trainer)
    epoch_times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"epoch": statistics.median(epoch_times), "total": stamps[-1] - start,
            "samples": len(data.y_train)}


def best_of(variants: dict[str, dict], epochs: int, repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, kwargs in variants.items():
            results[name].append(time_fit(epochs=epochs, **kwargs))
    return {name: min(runs, key=lambda r: r["epoch"]) for name, runs in results.items()}


def table(results: dict[str, dict[str, float]], baseline: str, epochs: int) -> None:
    base = results[baseline]["epoch"]
    print(f"  {'variant':<16}{'per epoch':>12}{'× ' + baseline:>10}{'samples/s':>12}{'with pass':>12}{'×':>8}")
    for name, r in results.items():
        amortized = r["total"] / epochs
        print(f"  {name:<16}{r['epoch'] * 1e3:>10.1f}ms{r['epoch'] / base:>10.2f}{r['samples'] / r['epoch']:>12.0f}"
              f"{amortized * 1e3:>10.1f}ms{amortized / (results[baseline]['total'] / epochs):>8.2f}")


def ddp_worker(epochs: int) -> None:
    """Under torchrun (or alone): time `kd` with the cache; rank 0 prints one JSON line."""
    env = distributed.init(torch.device("cpu"))
    try:
        result = time_fit("kd", epochs)
    finally:
        distributed.shutdown()
    if env.is_main:
        print(json.dumps({**result, "world_size": env.world_size, "threads": torch.get_num_threads()}))


def run_worker(args: list[str], epochs: int, threads: int) -> dict[str, float]:
    command = [*args, __file__, "--ddp-worker", "--epochs", str(epochs), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: stable figures on a shared machine, and what torchrun sets)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ddp_worker:
        ddp_worker(args.epochs)
        return

    data = load_data(DataConfig(), seed=0)
    teacher = build_model(TEACHER, "teacher", data.input_shape, data.num_classes)
    student = build_model(STUDENT, "student", data.input_shape, data.num_classes)
    ratio = count_params(teacher) / count_params(student)
    print(f"digits: {len(data.y_train)} training samples, batch 64, {args.epochs} epochs, best of {args.repeats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"teacher cnn w{TEACHER.width} d{TEACHER.depth}: {count_params(teacher):,} params; student cnn w{STUDENT.width} "
          f"d{STUDENT.depth}: {count_params(student):,} params; teacher/student = {ratio:.0f}×")

    print("\nCPU, one process:")
    time_fit("kd", 2)  # warm-up: first calls pay one-time costs
    results = best_of({"none": {"method": "none"}, "kd + cache": {"method": "kd"},
                       "kd online": {"method": "kd", "teacher_online": True}}, args.epochs, args.repeats)
    table(results, "none", args.epochs)
    cached = results["kd + cache"]["epoch"] / results["none"]["epoch"]
    online = results["kd online"]["epoch"] / results["kd + cache"]["epoch"]
    print(f"  kd + cache costs {cached:.2f}× the student alone (goal ≤ 1.15×): "
          f"{'met' if cached <= 1.15 else 'MISSED'}; the online teacher costs {online:.2f}× the cached run")

    print("\nCPU, DistributedDataParallel (gloo), kd + cache, same global batch:")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    single = run_worker([sys.executable], args.epochs, args.threads)
    double = run_worker(launcher, args.epochs, args.threads)
    for name, r in (("1 process", single), ("2 processes", double)):
        print(f"  {name:<16}{r['epoch'] * 1e3:>10.1f}ms per epoch{r['samples'] / r['epoch']:>10.0f} samples/s"
              f"  ({r['threads']} thread(s) per process)")
    print(f"  speed-up {single['epoch'] / double['epoch']:.2f}× (on {os.cpu_count()} cores shared with whatever else runs)")

    print("\nGPU, kd + cache, fp32 vs bf16:")
    if not torch.cuda.is_available():
        print("  skipped: torch sees no CUDA device on this machine")
        return
    gpu = best_of({"none fp32": {"method": "none", "device": "cuda", "precision": "fp32"},
                   "kd+cache fp32": {"method": "kd", "device": "cuda", "precision": "fp32"},
                   "kd+cache bf16": {"method": "kd", "device": "cuda", "precision": "bf16"},
                   "kd online bf16": {"method": "kd", "device": "cuda", "precision": "bf16", "teacher_online": True}},
                  args.epochs, args.repeats)
    table(gpu, "none fp32", args.epochs)


if __name__ == "__main__":
    main()
