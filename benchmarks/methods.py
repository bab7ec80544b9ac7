"""Benchmark: every distillation method that ships a pipeline, against the student trained from scratch.

For each registered method with a pipeline file (pipelines/<method>.yaml, or any
pipelines/*.yaml without a search section whose distill.method names it — the
embedded default digits.yaml is `kd`'s), run the teacher and distill stages for
every seed in-process through kdpipe.runner.run_pipeline with `--set seed=N`,
and the `none` baseline on the same pipeline (method and params swapped out), then
print one table:

    method | student test accuracy mean ± std | vs scratch (`none`) | teacher accuracy | s/run | epoch vs kd

The accuracy is the distill stage's PyTorch accuracy on the test split; std is
the sample standard deviation over seeds. "epoch vs kd" is the method's median
training epoch (report.json distill.timing) over kd's, and "ms/step over kd" what
each optimizer step costs beyond kd's (CRD's banks, MLKD's second view).

`--data digits32` runs every pipeline on 32×32 RGB images instead of 8×8 digits:
scikit-learn's digits written as a JPEG image folder (benchmarks/data.py), with
random crop (padding 4) + horizontal flip on the training split, the same for
every method (MLKD adds its own strong steps on its second view). Teachers are trained once per seed
(before any timing) and reused from a temporary content-hash cache; runs and the
MLflow store (sqlite) live in a temporary directory, removed at the end.

    .venv/bin/python benchmarks/methods.py                      # every method, seeds 0 1 2
    .venv/bin/python benchmarks/methods.py --methods kd nst --seeds 0 1 --epochs 10
    .venv/bin/python benchmarks/methods.py --data digits32      # the 32×32 image folder with augmentation
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
BASELINE = "none"
# --data digits32: every digit as a 64×64 RGB JPEG, read at 32×32, augmented as the CIFAR recipe does.
DIGITS32 = ["data.source=imagefolder", "data.image_size=32", "data.augment=[{random_crop: {padding: 4}}, hflip]",
            "data.normalize={mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}"]


@dataclass
class Runs:
    """One row of the table: the results of one pipeline over the seeds."""

    label: str
    pipeline: Path
    overrides: list[str]
    student: list[float] = field(default_factory=list)
    teacher: list[float] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)
    distill_seconds: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # median training epoch of each run
    steps_per_epoch: list[float] = field(default_factory=list)
    error: str | None = None


def pipeline_for(method: str) -> Path | None:
    """pipelines/<method>.yaml, else the first other pipeline file (without a search section) that uses the method."""
    own = PIPELINES / f"{method}.yaml"
    for path in [own] + sorted(p for p in PIPELINES.glob("*.yaml") if p != own):
        if not path.is_file():
            continue
        raw = yaml.safe_load(path.read_text()) or {}
        if (raw.get("distill") or {}).get("method", "kd") == method and raw.get("search") is None:
            return path
    return None


def applicable(pipeline: Path, overrides: list[str]) -> list[str]:
    """The overrides minus those inside a section the pipeline sets to null (teacher.* for a teacher-free DML)."""
    raw = yaml.safe_load(pipeline.read_text()) or {}
    return [o for o in overrides if "." not in o.partition("=")[0] or raw.get(o.partition(".")[0], {}) is not None]


def baseline_key(pipeline: Path, overrides: list[str]) -> str:
    """What the scratch student depends on: the resolved pipeline minus the method, teacher, naming and later stages."""
    from kdpipe.pipeline import load_pipeline

    resolved = load_pipeline(pipeline, applicable(pipeline, overrides)).resolved()
    for key in ("name", "teacher", "register", "export", "validate", "search"):  # none ignores the teacher
        resolved.pop(key, None)
    return json.dumps(resolved, sort_keys=True)


def run_once(pipeline: Path, overrides: list[str], until: str, workdir: Path, log) -> tuple[dict, float]:
    from kdpipe.runner import run_pipeline

    overrides = applicable(pipeline, overrides)
    start = time.perf_counter()
    with contextlib.redirect_stderr(log):  # the progress lines go to the log file, the table to stdout
        _, report = run_pipeline(pipeline, overrides, workdir / "runs", cache_dir=workdir / "cache", until=until)
    return report, time.perf_counter() - start


def describe(exc: Exception) -> str:
    message = exc.format(None) if hasattr(exc, "format") else str(exc)  # InputError names its key
    return f"{type(exc).__name__}: {message}".splitlines()[0][:120]


def measure(row: Runs, seeds: list[int], common: list[str], workdir: Path, log) -> None:
    for seed in seeds if row.error is None else []:
        try:
            report, seconds = run_once(row.pipeline, [*common, *row.overrides, f"seed={seed}"], "distill", workdir, log)
        except Exception as exc:  # one broken method must not hide the others' results
            traceback.print_exc(file=log)
            row.error = describe(exc)
            return
        row.student.append(report["student"]["accuracy_torch"])
        if report.get("teacher"):
            row.teacher.append(report["teacher"]["accuracy"])
        row.wall_seconds.append(seconds)
        row.distill_seconds.append(report["stage_seconds"]["distill"])
        timing = report["distill"]["timing"]
        row.epoch_seconds.append(timing["median_epoch_seconds"])
        row.steps_per_epoch.append(timing["optimizer_steps"] / timing["epochs"])
        print(f"  {row.label:<12} seed {seed}: student {row.student[-1]:.4f}  ({seconds:.1f} s)", file=sys.stderr, flush=True)


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):6.2f} ± {scale * std:4.2f}"


def relative_epoch(row: Runs, kd: Runs | None) -> str:
    if kd is None:
        return "—"
    return f"{statistics.fmean(row.epoch_seconds) / statistics.fmean(kd.epoch_seconds):.2f}×"


def step_cost(row: Runs, kd: Runs | None) -> str:
    """Milliseconds each optimizer step costs beyond kd's (the mean epoch over the mean steps per epoch)."""
    if kd is None:
        return "—"
    per_step = statistics.fmean(row.epoch_seconds) / statistics.fmean(row.steps_per_epoch)
    return f"{1e3 * (per_step - statistics.fmean(kd.epoch_seconds) / statistics.fmean(kd.steps_per_epoch)):+.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", help="methods to run (default: every registered method with a pipeline)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override distill.epochs in every pipeline")
    parser.add_argument("--data", choices=["pipeline", "digits32"], default="pipeline",
                        help="pipeline: each file's own data (8×8 digits); "
                             "digits32: the 32×32 image folder, augmented")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run, e.g. teacher.train.epochs=10 (repeatable)")
    args = parser.parse_args(argv)
    from kdpipe.methods import registry

    unknown = sorted(set(args.methods or []) - set(registry()))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry()))}")
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        workdir = Path(tmp)
        data = []
        if args.data == "digits32":
            from sklearn.datasets import load_digits

            sys.path.insert(0, str(ROOT / "benchmarks"))
            from data import write_images  # benchmarks/data.py

            data = [*DIGITS32, f"data.path={write_images(workdir / 'images', len(load_digits().target))}"]
        return benchmark(args, data, workdir, argv)


def benchmark(args, data: list[str], workdir: Path, argv: list[str] | None) -> int:
    """Every row over the seeds in `workdir` (runs, caches, the MLflow store); prints the table."""
    from kdpipe.methods import registry
    from kdpipe.pipeline import load_pipeline

    names = [m for m in args.methods or sorted(registry()) if m != BASELINE]  # the baseline always runs
    common = [*data, *args.overrides, *([f"distill.epochs={args.epochs}"] if args.epochs is not None else [])]

    rows: list[Runs] = []
    skipped = []
    for name in names:
        path = pipeline_for(name)
        if path is None:
            skipped.append(name)
        else:
            rows.append(Runs(name, path, []))
    # One scratch baseline per distinct student setup (data, student, epochs, optimizer, seed handling).
    # The scratch student sees the weak view alone (a strong view is read only by a two-view method, MLKD).
    scratch_overrides = [f"distill.method={BASELINE}", "distill.params={}", "distill.taps=null", "data.strong_augment=[]"]
    baselines: dict[str, Runs] = {}
    baseline_of: dict[str, Runs] = {}
    for row in rows:
        try:
            key = baseline_key(row.pipeline, [*common, *scratch_overrides])
        except Exception as exc:  # e.g. a pipeline file being edited: report it in its row, run the others
            row.error = describe(exc)
            continue
        if key not in baselines:
            baselines[key] = Runs(f"{BASELINE} ({row.pipeline.stem})", row.pipeline, scratch_overrides)
        baseline_of[row.label] = baselines[key]
    if len(baselines) == 1:  # every pipeline shares one student setup
        next(iter(baselines.values())).label = BASELINE

    print(f"$ {shlex.join([sys.executable, *sys.argv])}" if argv is None else f"$ methods.py {shlex.join(argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; seeds {args.seeds}; overrides {common or 'none'}")
    if skipped:
        print(f"no pipeline file (skipped): {', '.join(skipped)}")
    sys.stdout.flush()  # the header first, then the per-run lines on stderr

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ.pop("KDPIPE_CACHE_DIR", None)
    with open(workdir / "progress.log", "w") as log:
        # Train each (teacher setup, seed) once before any timing; the distill runs load it from the cache.
        warmed = set()
        for row in [*baselines.values(), *rows]:
            for seed in args.seeds:
                overrides = [*common, *row.overrides, f"seed={seed}"]
                resolved = load_pipeline(row.pipeline, applicable(row.pipeline, overrides)).resolved()
                key = json.dumps([resolved["teacher"], resolved["data"], seed], sort_keys=True)
                if resolved["teacher"] is None or key in warmed:
                    continue
                warmed.add(key)
                try:
                    run_once(row.pipeline, overrides, "teacher", workdir, log)
                except Exception:  # reported when the row itself runs
                    traceback.print_exc(file=log)
        for row in [*baselines.values(), *rows]:
            measure(row, args.seeds, common, workdir, log)
        failed = [r for r in [*baselines.values(), *rows] if r.error]
        if failed:
            log.flush()
            print((workdir / "progress.log").read_text()[-4000:], file=sys.stderr)

    print()
    header = f"{'method':<22} | {'student acc % (mean ± std)':>26} | {'vs none (pp)':>12} | {'teacher acc %':>13} | " \
             f"{'wall s/run':>10} | {'distill s/run':>13} | {'epoch vs kd':>11} | {'ms/step over kd':>15}"
    kd = next((r for r in rows if r.label == "kd" and r.epoch_seconds), None)
    print(header)
    print("-" * len(header))
    for row in [*baselines.values(), *rows]:
        if row.error:
            print(f"{row.label:<22} | FAILED: {row.error}")
            continue
        base = baseline_of.get(row.label)
        delta = "—"
        if base is not None and base.student and row.student:
            delta = f"{100 * (statistics.fmean(row.student) - statistics.fmean(base.student)):+.2f}"
        print(f"{row.label:<22} | {mean_std(row.student):>26} | {delta:>12} | {mean_std(row.teacher):>13} | "
              f"{statistics.fmean(row.wall_seconds):>10.1f} | {statistics.fmean(row.distill_seconds):>13.1f} | "
              f"{relative_epoch(row, kd):>11} | {step_cost(row, kd):>15}")
    print(f"\n{len(args.seeds)} seeds per row; std is the sample standard deviation; 'vs none' compares means with the "
          "scratch student of the same pipeline (same data, student, epochs, optimizer). Accuracy: PyTorch, test split.")
    return 1 if any(r.error for r in [*baselines.values(), *rows]) else 0


if __name__ == "__main__":
    sys.exit(main())
