"""Epoch time of distillation: cached teacher vs online teacher vs the student alone; DDP; GPU precision.

    .venv/bin/python benchmarks/speed.py [--epochs 10] [--repeats 3] [--part all|augmented|quality]

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

Augmented (`--part augmented`, also in `all`): 32×32 RGB images (scikit-learn's digits written as a JPEG
image folder, benchmarks/data.py), random crop (padding 4) + horizontal flip, a vgg8 teacher (50× the
resnet8 student's parameters), for 4, 10 and 20 epochs (`--aug-epochs`): the whole stage and the steady epoch of
the student alone (CE), KD with teacher views (kdpipe's default with augmentation, K = auto's min(8, epochs), its
view pass inside the stage), KD with the teacher online, and a hand-written online KD loop in plain PyTorch.
`--aug-images`, `--views`, `--aug-teacher` make it bigger.

Quality (`--part quality`): the same image folder (every digit), a teacher trained on it with the
augmentation, then KD with teacher views vs KD with the teacher online from the same initial student, for
seeds 0, 1, 2 and the same epochs: test accuracy, mean ± std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdpipe import distributed
from kdpipe.config import AUTO_TEACHER_VIEWS, ModelConfig, OptimizerConfig
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.methods import get_method
from kdpipe.models import build_model, count_params
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.train.settings import TrainerSettings

TEACHER = ModelConfig(arch="cnn", width=64, depth=4)
STUDENT = ModelConfig(arch="cnn", width=8, depth=2)
AUG_STUDENT = "resnet8"
AUGMENT = [{"random_crop": {"padding": 4}}, "hflip"]
AUG_BATCH = 64


def time_fit(method: str, epochs: int, device: str = "cpu", teacher_online: bool = False,
             precision: str = "fp32") -> dict[str, float]:
    """Train once; the median epoch time (epochs 2..), and the total wall time from the start of `fit`."""
    from kdpipe.train import Trainer

    data = load_data(data_config(), seed=0).to(torch.device(device))
    torch.manual_seed(0)
    teacher = build_model(TEACHER, "teacher", data.input_shape, data.num_classes).to(device)
    student = build_model(STUDENT, "student", data.input_shape, data.num_classes).to(device)
    stamps: list[float] = []

    def on_epoch(label, epoch, total, metrics):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    trainer = Trainer(data, epochs=epochs, batch_size=64, optimizer=OptimizerConfig(lr=0.05), seed=0,
                      on_epoch=on_epoch, settings=TrainerSettings(teacher_online=teacher_online, precision=precision))
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


def image_folder(root: Path, images: int, *, val_fraction: float, test_fraction: float):
    """`images` digits as 64×64 RGB JPEG files in class folders, loaded at 32×32 with AUGMENT on the training split."""
    sys.path.insert(0, str(Path(__file__).parent))
    from data import write_images  # benchmarks/data.py

    write_images(root, images)
    return load_data(data_config(source="imagefolder", path=root, image_size=32, augment=AUGMENT,
                                normalize={"mean": [0.5] * 3, "std": [0.25] * 3}, val_fraction=val_fraction,
                                test_fraction=test_fraction, batch_size=AUG_BATCH), seed=0)


def fit_augmented(data, method: str, teacher, *, epochs: int, seed: int, cache: TeacherOutputCache | None = None,
                  online: bool = False, views: int = 8, student=None) -> dict[str, float]:
    """Train `method` (kd or none) on augmented `data`: the median training epoch, the whole stage (view pass,
    every epoch and its validation), the view pass, test accuracy."""
    from kdpipe.inference import accuracy
    from kdpipe.train import Trainer

    torch.manual_seed(seed)
    student = student or build_model(ModelConfig(arch=AUG_STUDENT), "student", data.input_shape, data.num_classes)
    trainer = Trainer(data, epochs=epochs, batch_size=AUG_BATCH, optimizer=OptimizerConfig(lr=0.05), seed=seed,
                      settings=TrainerSettings(teacher_cache=cache, teacher_online=online, teacher_views=views,
                                               precision="fp32"))
    cls = get_method(method)
    start = time.perf_counter()
    trained = cls(cls.Params(), student=student, teacher=teacher if cls.needs_teacher else None,
                  num_classes=data.num_classes, input_shape=data.input_shape).fit(trainer).eval()
    stage = time.perf_counter() - start
    modes = {m["mode"]: m for m in trainer.teacher_modes}
    return {"epoch": trainer.timing_summary()["median_epoch_seconds"], "stage": stage,
            "pass": modes["views"]["seconds"] if "views" in modes else 0.0,
            "pass_batch": modes["views"]["teacher_pass"] if "views" in modes else None,
            "mode": "+".join(modes) or "none", "test_accuracy": accuracy(trained, data.x_test, data.y_test)}


def handwritten_online_kd(data, teacher, *, epochs: int, seed: int) -> dict[str, float]:
    """The loop a user writes without a framework, as a peer framework runs it: each epoch, the teacher under
    no_grad on every augmented batch, Hinton's loss (T 4, alpha 0.9, kdpipe's defaults), SGD with kdpipe's
    defaults and a cosine schedule, then validation accuracy. The batches come from the same augmentation, so
    only the loops differ."""
    torch.manual_seed(seed)
    student = build_model(ModelConfig(arch=AUG_STUDENT), "student", data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = -(-len(data.y_train) // AUG_BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    teacher.eval()
    temperature, alpha = 4.0, 0.9
    stamps = []
    start = time.perf_counter()
    for _ in range(epochs):
        student.train()
        for _, x, y in data.train_batches(AUG_BATCH, generator):
            with torch.no_grad():
                soft = torch.log_softmax(teacher(x) / temperature, dim=1)
            logits = student(x)
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits / temperature, dim=1), soft,
                                            reduction="batchmean", log_target=True) * temperature**2
            loss = (1 - alpha) * torch.nn.functional.cross_entropy(logits, y) + alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        stamps.append(time.perf_counter())
        student.eval()
        with torch.no_grad():
            (student(data.x_val).argmax(1) == data.y_val).float().mean().item()
    epoch_times = [b - a for a, b in zip([start, *stamps], stamps)]
    return {"epoch": statistics.median(epoch_times[1:] or epoch_times), "stage": time.perf_counter() - start,
            "mode": "online"}


def augmented_speed(images: int, epoch_counts: list[int], repeats: int, views: int | None, teacher_arch: str) -> None:
    """Per epoch count E: the student alone, KD with teacher views (K = views, or `auto`'s min(8, E)), KD with the
    teacher online and the hand-written online loop, each a whole stage from one start, best of `repeats`."""
    with tempfile.TemporaryDirectory() as tmp:
        data = image_folder(Path(tmp), images, val_fraction=0.1, test_fraction=0.1)
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(arch=teacher_arch), "teacher", data.input_shape, data.num_classes).eval()
    student = build_model(ModelConfig(arch=AUG_STUDENT), "student", data.input_shape, data.num_classes)
    ratio = count_params(teacher) / count_params(student)
    n = len(data.y_train)
    print(f"\nAugmented 32×32 RGB (digits image folder): {n} training images, random crop (padding 4) + hflip, "
          f"batch {AUG_BATCH}, best of {repeats}")
    print(f"teacher {teacher_arch}: {count_params(teacher):,} params; student {AUG_STUDENT}: {count_params(student):,} "
          f"params; teacher/student = {ratio:.1f}×; teacher views {views or 'auto: min(8, epochs)'}")
    fit_augmented(data, "kd", teacher, epochs=1, seed=0, online=True)  # warm-up: first calls pay one-time costs
    for epochs in epoch_counts:
        k = views or max(1, min(AUTO_TEACHER_VIEWS, epochs))
        variants = {"none (CE)": lambda: fit_augmented(data, "none", teacher, epochs=epochs, seed=0),
                    # a fresh cache each time: the whole stage pays its view pass, as a first run does
                    "kd + views": lambda: fit_augmented(data, "kd", teacher, epochs=epochs, seed=0, views=k,
                                                        cache=TeacherOutputCache()),
                    "kd online": lambda: fit_augmented(data, "kd", teacher, epochs=epochs, seed=0, online=True),
                    "hand-written": lambda: handwritten_online_kd(data, teacher, epochs=epochs, seed=0)}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fit in variants.items():
                runs[name].append(fit())
        best = {name: min(r, key=lambda x: x["stage"]) for name, r in runs.items()}
        base = best["none (CE)"]
        print(f"\n  {epochs} epochs, K = {k} views:")
        print(f"  {'variant':<14}{'teacher':>9}{'per epoch':>12}{'× none':>8}{'stage':>10}{'× none':>8}"
              f"{'per epoch of stage':>20}")
        for name, r in best.items():
            print(f"  {name:<14}{r['mode']:>9}{r['epoch'] * 1e3:>10.0f}ms{r['epoch'] / base['epoch']:>8.2f}"
                  f"{r['stage']:>9.1f}s{r['stage'] / base['stage']:>8.2f}{r['stage'] / epochs * 1e3:>18.0f}ms")
        viewed, online, handwritten = best["kd + views"], best["kd online"], best["hand-written"]
        teacher_share = online["epoch"] - viewed["epoch"]  # the teacher's forward per epoch, run online
        bound = 1.1 * (base["stage"] + k * teacher_share)
        print(f"  view pass {viewed['pass']:.1f} s ({n * k} teacher forwards); the online teacher's share "
              f"{teacher_share * 1e3:.0f} ms per epoch")
        print(f"  kd + views stage {viewed['stage']:.1f} s ≤ 1.1 × (none's stage + K × the teacher's share) = "
              f"{bound:.1f} s: {'met' if viewed['stage'] <= bound else 'MISSED'}; "
              f"{viewed['stage'] / handwritten['stage']:.2f}× the hand-written online loop"
              + (f" (goal ≤ 0.75× at 20 epochs): {'met' if viewed['stage'] <= 0.75 * handwritten['stage'] else 'MISSED'}"
                 if epochs == 20 else ""))
        probed = viewed["pass_batch"]
        per_view = viewed["pass"] / (n * k)
        print(f"  view pass at batch {probed['batch']} (ms per row probed: {probed['probed_ms_per_row']}): "
              f"{per_view * 1e3:.3f} ms per view; the online teacher {teacher_share / n * 1e3:.3f} ms per image at "
              f"batch {AUG_BATCH}: {per_view / (teacher_share / n):.2f}× (goal ≤ 1.05×): "
              f"{'met' if per_view <= 1.05 * teacher_share / n else 'MISSED'}")


def quality(epochs: int, teacher_epochs: int, seeds: list[int], views: int, teacher_arch: str) -> None:
    """KD with teacher views vs KD with the online teacher on the augmented digits folder, same epochs and seeds."""
    from kdpipe.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = image_folder(Path(tmp), 1797, val_fraction=0.15, test_fraction=0.2)
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(arch=teacher_arch), "teacher", data.input_shape, data.num_classes)
    get_method("none")(get_method("none").Params(), student=teacher, teacher=None, num_classes=data.num_classes,
                       input_shape=data.input_shape).fit(
        Trainer(data, epochs=teacher_epochs, batch_size=AUG_BATCH, optimizer=OptimizerConfig(lr=0.05), seed=0))
    teacher.eval()
    from kdpipe.inference import accuracy

    print(f"\nQuality: digits image folder at 32×32, {len(data.y_train)} training / {len(data.y_test)} test images, "
          f"random crop (padding 4) + hflip; teacher {teacher_arch} trained {teacher_epochs} epochs, test accuracy "
          f"{accuracy(teacher, data.x_test, data.y_test):.4f}; student {AUG_STUDENT}, kd (T 4, alpha 0.9), "
          f"{epochs} epochs, {views} views, seeds {seeds}")
    results: dict[str, list[float]] = {"kd + views": [], "kd online": []}
    for seed in seeds:
        for name, online in (("kd + views", False), ("kd online", True)):
            r = fit_augmented(data, "kd", teacher, epochs=epochs, seed=seed, online=online, views=views,
                              cache=TeacherOutputCache())
            results[name].append(r["test_accuracy"])
            print(f"  seed {seed}  {name:<11} teacher {r['mode']:<7} test accuracy {r['test_accuracy']:.4f}", flush=True)
    for name, accs in results.items():
        print(f"  {name:<11} {statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}  ({', '.join(f'{a:.4f}' for a in accs)})")
    gap = (statistics.mean(results["kd online"]) - statistics.mean(results["kd + views"])) * 100
    print(f"  views − online: {-gap:+.2f} points (goal: within 1 point below): {'met' if gap <= 1.0 else 'MISSED'}")


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
    parser.add_argument("--part", choices=["all", "augmented", "quality"], default="all",
                        help="all: digits, augmented, DDP, GPU; augmented: the augmented rows alone; quality: views "
                             "vs online accuracy (minutes)")
    parser.add_argument("--aug-images", type=int, default=800, help="augmented: images written (80%% train)")
    parser.add_argument("--aug-epochs", default="4,10,20", help="augmented: the epoch counts, comma-separated")
    parser.add_argument("--aug-teacher", default="vgg8", help="augmented and quality: a zoo teacher (`kdpipe models`)")
    parser.add_argument("--views", type=int, default=None,
                        help="distill.teacher_views (augmented: default auto, min(8, epochs); quality: 8)")
    parser.add_argument("--quality-epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=10, help="quality: epochs of the teacher's training")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epoch_counts = [int(e) for e in args.aug_epochs.split(",")]
    if args.ddp_worker:
        ddp_worker(args.epochs)
        return
    if args.part == "quality":
        quality(args.quality_epochs, args.teacher_epochs, [0, 1, 2], args.views or 8, args.aug_teacher)
        return
    if args.part == "augmented":
        augmented_speed(args.aug_images, epoch_counts, args.repeats, args.views, args.aug_teacher)
        return

    data = load_data(data_config(), seed=0)
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
    augmented_speed(args.aug_images, epoch_counts, args.repeats, args.views, args.aug_teacher)

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
