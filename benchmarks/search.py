"""A search campaign against a loop of separate runs, side by side.

Wall time of one `kdpipe run` over a campaign of N trials (kd over its declared
temperature and alpha ranges) against N separate `kdpipe run` calls with the
very parameters the campaign's trials drew and the same settings (target ratio
≤ 0.4), and the best accuracy the campaign found against the default
parameters'. The teacher is trained once beforehand, outside both timings.

    python benchmarks/search.py [--trials 20] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "pipelines" / "digits.yaml"
SEARCH = ROOT / "pipelines" / "digits-search.yaml"


def kdpipe_run(pipeline: Path, overrides: list[str], cwd: Path) -> tuple[dict, float]:
    """One `kdpipe run` process; returns its report and wall seconds. Exit 1 (a gate failed) still has a report."""
    args = [sys.executable, "-m", "kdpipe", "run", str(pipeline), *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"kdpipe run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10, help="distill epochs, the same in every trial and run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kdpipe-bench-search-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["KDPIPE_CACHE_DIR"] = str(work / "cache")
    common = [f"distill.epochs={args.epochs}"]

    default, _ = kdpipe_run(DIGITS, common, work)  # trains and caches the teacher: outside both timings
    campaign, campaign_s = kdpipe_run(SEARCH, [*common, "search.space=auto", f"search.trials={args.trials}"], work)
    found = campaign["search"]
    study = optuna.load_study(study_name=found["study"], storage=f"sqlite:///{campaign['run_dir']}/search.db")

    loop_s, loop_best = 0.0, 0.0
    for trial in study.trials:
        params = [f"distill.params.{name}={value}" for name, value in trial.params.items()]
        report, seconds = kdpipe_run(DIGITS, [*common, *params], work)
        loop_s += seconds
        loop_best = max(loop_best, report["student"]["val_accuracy"])

    print(f"{'':34}{'campaign':>12}{'separate runs':>16}")
    print(f"{'trials':34}{found['n_trials']:>12}{len(study.trials):>16}")
    print(f"{'wall time, s':34}{campaign_s:>12.1f}{loop_s:>16.1f}")
    print(f"{'best val accuracy':34}{found['best_value']:>12.4f}{loop_best:>16.4f}")
    print(f"campaign: {found['n_complete']} complete, {found['n_pruned']} pruned, {found['n_failed']} failed; "
          f"teacher forward passes {found['teacher_forward_passes']}")
    ratio = campaign_s / loop_s
    print(f"wall-time ratio campaign / separate runs: {ratio:.3f} (target ≤ 0.4: {'met' if ratio <= 0.4 else 'MISSED'})")
    print(f"best params {found['best_params']}: val accuracy {found['best_value']:.4f}, "
          f"test accuracy {campaign['student']['accuracy']:.4f}")
    print(f"default params {default['method']['params']}: val accuracy {default['student']['val_accuracy']:.4f}, "
          f"test accuracy {default['student']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
