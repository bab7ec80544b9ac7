"""GPU step: kdpipe's distill epoch against a hand-written KD loop, eager and with CUDA graphs.

    .venv/bin/python benchmarks/gpu.py [--images 40000] [--epochs 5] [--batches 256 1024]

Same models (zoo resnet8 student, width 16; zoo resnet32x4 teacher, 7.4M params), same data on the device
(random uint8 3×32×32 images, 100 classes), bf16 autocast, channels_last, the teacher's logits computed once,
the same loss (0.1·CE + 0.9·kd_loss at T=4) and SGD (lr 0.05, Nesterov momentum 0.9, weight decay 5e-4, fixed
lr). Rows, per batch size:

  hand eager    the loop an engineer writes by hand (as /work/shared/gpu-reference/plain_kd.py)
  hand graph    the same step captured as one CUDA graph and replayed (as gpu-reference/graph_kd.py)
  kdpipe eager  Trainer.run with method kd (teacher cache on), compile: false
  kdpipe graph  the same with compile: true (torch.compile mode reduce-overhead: CUDA graphs)

Seconds per epoch are the median of epochs 2.. (the first pays cuDNN autotuning, compilation and graph capture);
kdpipe's are the trainer's own epoch_seconds (validation excluded, as in the hand loops). "× hand eager" is the
hand eager loop's seconds divided by the row's: how many times faster. Without CUDA it prints one skip line and
exits 0; `--device cpu` runs a small functional check of the script instead (its times mean nothing, and the
graph rows are CUDA-only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.config import ModelConfig, OptimizerConfig
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.losses import kd_loss
from kdpipe.methods import get_method
from kdpipe.models import build_model, count_params
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.train import Trainer, TrainerSettings

STUDENT = ModelConfig(arch="resnet8")
TEACHER = ModelConfig(arch="resnet32x4")
CLASSES = 100
TEMPERATURE, ALPHA = 4.0, 0.9
OPTIMIZER = OptimizerConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, scheduler="none")


def make_data(images: int, directory: Path, device: torch.device):
    """`images` training images (plus a tenth more each for validation and test), uint8, stored on `device`."""
    total = round(images / 0.8)
    rng = np.random.default_rng(0)
    path = directory / "random.npz"
    np.savez(path, x=rng.integers(0, 256, (total, 3, 32, 32), dtype=np.uint8), y=rng.integers(0, CLASSES, total))
    return load_data(data_config(source="npz", path=path, val_fraction=0.1, test_fraction=0.1), seed=0).to(device)


def student_model(data) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(STUDENT, "student", data.input_shape, data.num_classes).to(data.y_train.device)


def kdpipe_epochs(data, teacher, cache: TeacherOutputCache, batch: int, graphs: bool, epochs: int) -> list[float]:
    """kdpipe's distill epoch: Trainer.run with method kd, bf16, the teacher's outputs from `cache`."""
    torch.compiler.reset()  # each compiled student starts from a clean compile cache (no recompile limit reached)
    trainer = Trainer(data, epochs=epochs, batch_size=batch, optimizer=OPTIMIZER, seed=0,
                      settings=TrainerSettings(teacher_cache=cache, precision="bf16", compile=graphs))
    kd = get_method("kd")
    kd(kd.Params(temperature=TEMPERATURE, alpha=ALPHA), student=student_model(data), teacher=teacher,
       num_classes=data.num_classes, input_shape=data.input_shape).fit(trainer)
    return [e["epoch_seconds"] for e in trainer.epoch_log]


def hand_epochs(data, teacher_logits: torch.Tensor, batch: int, graphs: bool, epochs: int) -> list[float]:
    """The hand-written loop on the same stored images, labels and teacher logits; full batches only."""
    device = data.y_train.device
    cuda = device.type == "cuda"
    channels_last = torch.channels_last
    student = student_model(data).to(memory_format=channels_last).train()
    opt = torch.optim.SGD(student.parameters(), lr=OPTIMIZER.lr, momentum=OPTIMIZER.momentum,
                          nesterov=OPTIMIZER.nesterov, weight_decay=OPTIMIZER.weight_decay)
    x_train, y_train, n = data.x_train, data.y_train, len(data.y_train)

    def step(x_uint8: torch.Tensor, y: torch.Tensor, teacher_batch: torch.Tensor) -> None:
        x = (x_uint8.float() / 255).contiguous(memory_format=channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graphs):
            logits = student(x)
            loss = (1 - ALPHA) * F.cross_entropy(logits, y) + ALPHA * kd_loss(logits, teacher_batch, TEMPERATURE)
        loss.backward()
        opt.step()

    if graphs:
        # Static inputs; three warm-up steps on a side stream, then one step captured (as graph_kd.py does).
        static_x = torch.zeros((batch, *data.input_shape), dtype=x_train.dtype, device=device)
        static_y = torch.zeros(batch, dtype=y_train.dtype, device=device)
        static_t = torch.zeros(batch, teacher_logits.shape[1], device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step(static_x, static_y, static_t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # backward then writes fresh gradients from the graph's pool every replay
        with torch.cuda.graph(graph):
            step(static_x, static_y, static_t)

        def run_step(index: torch.Tensor) -> None:
            static_x.copy_(x_train[index])
            static_y.copy_(y_train[index])
            static_t.copy_(teacher_logits[index])
            graph.replay()
    else:
        def run_step(index: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            step(x_train[index], y_train[index], teacher_logits[index])

    seconds = []
    for _ in range(epochs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(n, device=device)
        for i in range(0, n - batch + 1, batch):
            run_step(order[i:i + batch])
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40_000, help="training images (random 3×32×32)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per row; the first is not counted")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--modes", nargs="+", choices=["eager", "graph"], default=["eager", "graph"])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a functional check only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped: torch sees no CUDA device on this machine")
        return
    modes = [m for m in args.modes if m == "eager" or device.type == "cuda"]
    torch.backends.cudnn.benchmark = True  # as kdpipe's trainer sets it on CUDA: the hand loops get it too

    with tempfile.TemporaryDirectory(prefix="kdpipe-gpu-") as tmp:
        data = make_data(args.images, Path(tmp), device)
    torch.manual_seed(0)
    teacher = build_model(TEACHER, "teacher", data.input_shape, data.num_classes).to(device)
    student = student_model(data)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (functional check, times mean nothing)"
    print(f"{name}; torch {torch.__version__}; {len(data.y_train)} training images 3×32×32 on the device; bf16, "
          f"channels_last; teacher {TEACHER.arch} {count_params(teacher):,} params, student {STUDENT.arch} "
          f"{count_params(student):,} params; median of epochs 2..{args.epochs}")
    cache = TeacherOutputCache()
    start = time.perf_counter()
    teacher_logits = cache.get(teacher.to(memory_format=torch.channels_last) if device.type == "cuda" else teacher,
                               data, [], autocast=torch.bfloat16, channels_last=device.type == "cuda").logits
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"teacher pass (once, shared by every row): {time.perf_counter() - start:.2f}s")

    rows: list[tuple[str, int, float]] = []
    for batch in args.batches:
        for mode in modes:
            graphs = mode == "graph"
            rows.append((f"hand {mode}", batch, steady(hand_epochs(data, teacher_logits, batch, graphs, args.epochs))))
            rows.append((f"kdpipe {mode}", batch, steady(kdpipe_epochs(data, teacher, cache, batch, graphs, args.epochs))))

    base = {batch: s for label, batch, s in rows if label == "hand eager"}
    print(f"\n  {'loop':<14}{'batch':>6}{'s/epoch':>10}{'images/s':>11}{'× hand eager':>14}")
    for label, batch, seconds in rows:
        print(f"  {label:<14}{batch:>6}{seconds:>10.3f}{len(data.y_train) / seconds:>11.0f}{base[batch] / seconds:>14.2f}")
    for batch in args.batches:
        ratios = {label: base[batch] / s for label, b, s in rows if b == batch}
        goals = [("kdpipe eager", 1.0)] + ([("kdpipe graph", 4.0)] if batch == 256 and "kdpipe graph" in ratios else [])
        for label, goal in goals:
            verdict = "met" if ratios[label] >= goal else "MISSED"
            print(f"  batch {batch}: {label} {ratios[label]:.2f}× the hand eager loop (goal ≥ {goal:.1f}×): {verdict}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
