"""Multi-seed runs: `kdpipe run --seeds 0,1,2 FILE` (or `seeds:` in the file) runs the pipeline once per seed.

The parent run directory (runs/NAME/RUN_ID) holds the pipeline's record, a ledger of the finished seeds and the
report; each seed's run is an ordinary run directory inside it (seed-S, and baseline-S for `distill.baseline`),
its MLflow run nested under the parent's (tag mlflow.parentRunId). With seed_scope student (the default) the seeds
vary the student only: the data split and the teacher come from `seed`, so the teacher is trained once and read
from the cache by every other seed. Each seed's run stops after validate; the parent then decides the gates on the
mean over seeds, and only when the mean passes, continues the best seed's run (of those passing every gate on their
own) through register. `kdpipe run --resume PARENT_DIR` skips the finished seeds' runs and continues the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from kdpipe import __version__, distributed
from kdpipe.atomic import write_json
from kdpipe.cache_store import CACHE_DIR_ENV, check_cache_dir
from kdpipe.errors import InputError, RunInterrupted
from kdpipe.html_report import render_seeds, write_page
from kdpipe.pipeline import Pipeline, load_pipeline
from kdpipe.progress import Progress
from kdpipe.report import new_report
from kdpipe.resume import check_resumed, run_record, write_record
from kdpipe.runner import Nest, run_pipeline
from kdpipe.run_scope import ResumedTracker, lock_run_dir, new_run_id, signals_interrupt_the_run
from kdpipe.tracking import Tracker, check_reachable, load_tracking_config

LEDGER = "ledger.json"
SPREAD = "sample standard deviation (n − 1)"
BEST_EPOCH, LAST_EPOCH = "best epoch on validation", "last epoch"
# report.json key → (where each seed's report holds it, its epoch policy). The delivered model carries the weights
# of the epoch best on validation, so its test accuracy is that epoch's.
STUDENT_NUMBERS = {
    "student_val_accuracy_best_epoch": (("student", "val_accuracy_best_epoch"), BEST_EPOCH),
    "student_val_accuracy_last_epoch": (("student", "val_accuracy_last_epoch"), LAST_EPOCH),
    "student_test_accuracy": (("student", "accuracy"), BEST_EPOCH),
}
# Compared with the baseline: both students in PyTorch at FP32 (the distilled one's delivered model may be INT8).
GAIN_NUMBERS = {
    "student_val_accuracy_best_epoch": (("student", "val_accuracy_best_epoch"), BEST_EPOCH),
    "student_val_accuracy_last_epoch": (("student", "val_accuracy_last_epoch"), LAST_EPOCH),
    "student_test_accuracy_torch": (("student", "accuracy_torch"), BEST_EPOCH),
}


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` as a list; InputError naming --seeds for anything else (the pipeline checks the values)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError("--seeds", f"expected comma-separated integers like 0,1,2, got '{text}'") from None


def is_multi_seed(pipeline_file: Path | None, overrides: list[str], resume: Path | None) -> bool:
    """Whether this run is a multi-seed one: the run directory of one, or a pipeline (with overrides) with seeds."""
    if resume is not None:
        return _read_ledger(resume) is not None
    return load_pipeline(pipeline_file, overrides).seeds is not None


def _read_ledger(run_dir: Path) -> dict[str, Any] | None:
    """A multi-seed run directory's ledger, or None for any other directory (the runner judges those)."""
    try:
        ledger = json.loads((Path(run_dir) / LEDGER).read_text())
    except (OSError, ValueError):
        return None
    return ledger if isinstance(ledger, dict) and ledger.get("kind") == "seeds" else None


def seed_runs(pipeline: Pipeline) -> list[tuple[str, int]]:
    """(run directory name, seed) of each run, in run order: each seed's distilled student, then its baseline."""
    kinds = ["seed", "baseline"] if pipeline.distill.baseline else ["seed"]
    return [(f"{kind}-{seed}", seed) for seed in pipeline.seeds for kind in kinds]


def child_overrides(pipeline: Pipeline, name: str, seed: int) -> list[str]:
    """The parent's record made one seed's single run: the seed as the student's seed (or the run's, with seed_scope
    run), and for a baseline the same student trained without distillation."""
    overrides = ["seeds=null", "seed_scope=student", "distill.baseline=false",
                 f"seed={seed}" if pipeline.seed_scope == "run" else f"student_seed={seed}"]
    if name.startswith("baseline-"):
        overrides += ["distill.method=none", "distill.params={}"]
    return overrides


# --- the numbers over seeds ---------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1) of `values` (at least 2)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": len(values)}


def _read(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = report
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def teacher_policy(report: dict[str, Any]) -> str:
    source = str((report.get("teacher") or {}).get("source", ""))
    return BEST_EPOCH if source == "trained" or source.startswith("cache") else f"as given ({source})"


def summarize(seeds: list[int], reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """report.json's `seeds` numbers: each seed's, and their mean ± std per number, with its epoch policy; the gain
    over the baseline (mean ± std of the per-seed differences) where the runs hold baselines."""
    runs = [reports[f"seed-{s}"] for s in seeds]
    numbers = {key: (path, policy) for key, (path, policy) in STUDENT_NUMBERS.items()}
    if all(r.get("teacher") for r in runs):
        numbers["teacher_test_accuracy"] = (("teacher", "accuracy"), teacher_policy(runs[0]))
    # status: "stopped" (after validate) for a seed's run the parent did not take on through register
    per_seed = [{"seed": s, "run_dir": r["run_dir"], "mlflow_run_id": r["mlflow"]["run_id"], "status": r["status"],
                 "registered": False, "gates_passed": all(g["passed"] for g in r["gates"].values()),
                 **{key: _read(r, path) for key, (path, _) in numbers.items()}} for s, r in zip(seeds, runs)]
    summary = {key: {**spread([row[key] for row in per_seed]), "epoch_policy": policy}
               for key, (_, policy) in numbers.items() if all(row[key] is not None for row in per_seed)}
    out = {"seeds": seeds, "std": SPREAD, "runs": per_seed, "summary": summary}
    if all(f"baseline-{s}" in reports for s in seeds):
        baselines = [reports[f"baseline-{s}"] for s in seeds]
        gains = {}
        for key, (path, policy) in GAIN_NUMBERS.items():
            pairs = [(_read(r, path), _read(b, path)) for r, b in zip(runs, baselines)]
            if all(None not in pair for pair in pairs):
                gains[key] = {**spread([d - b for d, b in pairs]), "epoch_policy": policy,
                              "distilled": [d for d, _ in pairs], "baseline": [b for _, b in pairs]}
        out["baseline"] = {"method": "none", "runs": [{"seed": s, "run_dir": b["run_dir"],
                                                       "mlflow_run_id": b["mlflow"]["run_id"]}
                                                      for s, b in zip(seeds, baselines)],
                           "gain": gains}
    return out


def at_least(gate: str) -> bool:
    """Whether a gate's value must reach its limit from above (accuracy_min, speedup_vs_teacher_min:bsN); every
    other gate's value must stay at or below it (drops, latencies, sizes, p-values, parity)."""
    return gate.split(":")[0].endswith("_min")


def mean_gates(reports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each gate decided on the mean of its value over the seeds' runs; a gate some run holds no value for (it was
    not measured) passes only when it passed in every run."""
    names = list(dict.fromkeys(name for r in reports for name in r["gates"]))
    gates = {}
    for name in names:
        held = [r["gates"].get(name) for r in reports]
        limit = next(g["limit"] for g in held if g is not None)
        if any(g is None or g["value"] is None for g in held):
            gates[name] = {"value": None, "limit": limit,
                           "passed": all(g is not None and g["passed"] for g in held)}
            continue
        mean = statistics.fmean(g["value"] for g in held)
        gates[name] = {"value": mean, "limit": limit, "passed": mean >= limit if at_least(name) else mean <= limit}
    return gates


def best_seed(per_seed: list[dict[str, Any]]) -> tuple[int | None, str]:
    """The seed to register, and why: of the seeds whose runs passed every gate on their own, the most accurate on
    the test split (the earlier seed on a tie); None when no run passed on its own."""
    passing = [row for row in per_seed if row["gates_passed"]]
    if not passing:
        return None, "no seed's run passed every gate on its own"
    best = max(passing, key=lambda row: (row["student_test_accuracy"], -per_seed.index(row)))
    return best["seed"], (f"the highest student test accuracy ({best['student_test_accuracy']:.4f}) of the "
                          f"{len(passing)} seed(s) whose runs passed every gate on their own")


# --- the run ------------------------------------------------------------------------------------------------------


def run_seeds(pipeline_file: Path | None, overrides: list[str], runs_dir: Path, cache_dir: Path | None,
              mlflow_config: Path | None, until: str | None, resume: Path | None) -> tuple[Path, dict[str, Any]]:
    """Run (or, with `resume`, continue) a multi-seed run; returns (the parent's report path, its report).
    InputError before anything is made for what it cannot do: stop early, run under torchrun."""
    from kdpipe.prepare import prepare

    if until is not None:
        raise InputError("--until", "a multi-seed run takes each seed's run through validate, then registers the best "
                                    "one; it cannot stop after a stage (run one seed with seed: for that)")
    if distributed.from_environment().world_size > 1:
        raise InputError("seeds", "a multi-seed run runs its seeds one after another in one process; start it "
                                  "without torchrun")
    ledger: dict[str, Any] = {"kind": "seeds", "finished": []}
    check_cache_dir(cache_dir, runs_dir if resume is None else None)
    with contextlib.ExitStack() as held:
        if resume is not None:
            run_dir = Path(resume).resolve()
            held.enter_context(lock_run_dir(run_dir))
            ledger = _read_ledger(run_dir)  # as the last process that worked in it left it
            pipeline_file, overrides = run_dir / "pipeline.yaml", []
        prepared = prepare(pipeline_file, overrides)
        if resume is not None:
            ledger.update(check_resumed(ledger, prepared.pipeline, prepared.data, run_dir))
        tracking = load_tracking_config(mlflow_config)
        check_reachable(tracking)
        with signals_interrupt_the_run():
            parent = _Parent.open(prepared, runs_dir, cache_dir, tracking, mlflow_config, ledger, resume, held)
            return parent.go()


class _Parent:
    """The parent run of a multi-seed run: its run directory, ledger, MLflow run and report."""

    def __init__(self, pipeline: Pipeline, run_dir: Path, ledger: dict[str, Any], tracker, runs_dir: Path,
                 mlflow_config: Path | None):
        self.pipeline, self.run_dir, self.ledger, self.tracker = pipeline, run_dir, ledger, tracker
        self.runs_dir, self.mlflow_config = runs_dir, mlflow_config
        self.progress = Progress()
        self.step = "setup"  # the seed's run in progress, named in the report when the run ends badly
        self.command = f"kdpipe run --resume {run_dir}" + (f" --mlflow-config {mlflow_config}" if mlflow_config
                                                           else "")

    @classmethod
    def open(cls, prepared, runs_dir: Path, cache_dir: Path | None, tracking, mlflow_config: Path | None,
             ledger: dict[str, Any], resume: Path | None, held: contextlib.ExitStack) -> _Parent:
        pipeline = prepared.pipeline
        if resume is not None:
            run_dir = Path(resume).resolve()
            ledger["report"] = {**ledger["report"], "status": "running",
                                "resumed": ledger["report"].get("resumed", 0) + 1}
            tracker = ResumedTracker(Tracker(tracking), ledger["mlflow_run_id"])
            return cls(pipeline, run_dir, ledger, tracker, run_dir.parent.parent, mlflow_config)
        runs_dir = Path(runs_dir).resolve()
        run_id = new_run_id()
        run_dir = runs_dir / pipeline.name / run_id
        run_dir.mkdir(parents=True)
        held.enter_context(lock_run_dir(run_dir))
        write_record(run_dir, pipeline)
        base = new_report(pipeline, run_dir, run_id, prepared.data, prepared.device, tracking)
        tracker = Tracker(tracking)
        base["mlflow"]["run_id"] = tracker.start(f"{pipeline.name}-{run_id}", {
            "kdpipe.version": __version__, "kdpipe.run_dir": str(run_dir), "kdpipe.method": pipeline.distill.method,
            "kdpipe.seeds": ",".join(map(str, pipeline.seeds))})
        tracker.log_params(pipeline.resolved())
        cache_dir = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or runs_dir / ".cache").resolve()
        ledger.update(run_record(pipeline, prepared.data), report=base, mlflow_run_id=base["mlflow"]["run_id"],
                      cache_dir=str(cache_dir))  # every seed's run caches there, so the teacher is trained once
        parent = cls(pipeline, run_dir, ledger, tracker, runs_dir, mlflow_config)
        parent.save_ledger()
        return parent

    def save_ledger(self) -> None:
        write_json(self.run_dir / LEDGER, self.ledger)

    def go(self) -> tuple[Path, dict[str, Any]]:
        try:
            reports = {name: self.run_child(name, seed, "distill" if name.startswith("baseline-") else "validate")
                       for name, seed in seed_runs(self.pipeline)}
            self.step = "report"
            report = self.finish(reports)
        except BaseException as exc:
            self.end_badly(exc)
            raise
        return self.run_dir / "report.json", report

    def run_child(self, name: str, seed: int, until: str | None) -> dict[str, Any]:
        """One seed's run through `until` (None: through register); its report. A run that got that far before is
        read back, one interrupted continues (--resume), one killed before its ledger existed starts again."""
        self.step = name
        child_dir = self.run_dir / name
        if name in self.ledger["finished"] and (until is not None or name == self.ledger.get("registered")):
            return json.loads((child_dir / "report.json").read_text())
        if child_dir.exists() and not (child_dir / LEDGER).is_file():
            shutil.rmtree(child_dir)  # nothing in it could be continued: no stage had begun
        resume = child_dir if child_dir.exists() else None
        self.progress.info(f"[{name}] {'continued' if resume else 'started'} in {child_dir}")
        nest = Nest(child_dir, f"{self.ledger['report']['run_id']}-{name}", self.ledger["mlflow_run_id"], seed,
                    self.command)
        _, report = run_pipeline(self.run_dir / "pipeline.yaml", child_overrides(self.pipeline, name, seed),
                                 self.runs_dir, cache_dir=Path(self.ledger["cache_dir"]),
                                 mlflow_config=self.mlflow_config, until=until, resume=resume, nest=nest)
        if name not in self.ledger["finished"]:
            self.ledger["finished"].append(name)
        if until is None:
            self.ledger["registered"] = name
        self.save_ledger()
        return report

    def finish(self, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The gates on the mean, the best seed registered when they pass, report.json and the parent's MLflow
        metrics, computed once over every seed."""
        seeds = self.pipeline.seeds
        found = summarize(seeds, reports)
        gates = mean_gates([reports[f"seed-{s}"] for s in seeds])
        passed = all(g["passed"] for g in gates.values())
        base = {**self.ledger["report"]}
        if passed:
            seed, why = best_seed(found["runs"])
            if seed is not None:
                self.step = f"seed-{seed}"
                registered = reports[f"seed-{seed}"] = self.run_child(f"seed-{seed}", seed, None)
                found["runs"][seeds.index(seed)].update(status=registered["status"], registered=True)
                base["mlflow"] = {**base["mlflow"], **{k: registered["mlflow"].get(k) for k in (
                    "model_uri", "model_name", "model_version", "aliases", "alias", "registry")}}
            found["registered"] = {"seed": seed, "why": why}
        else:
            failed = ", ".join(name for name, g in gates.items() if not g["passed"])
            found["registered"] = {"seed": None, "why": f"not registered: the mean over seeds failed gate(s): {failed}"}
        report = {**base, **({"status": "passed" if passed else "failed"}), "seeds": found, "gates": gates,
                  "student": {"accuracy": found["summary"]["student_test_accuracy"]["mean"]}}
        if "teacher_test_accuracy" in found["summary"]:
            report["teacher"] = {"accuracy": found["summary"]["teacher_test_accuracy"]["mean"]}
        report.pop("stage_seconds", None)
        page = self.run_dir / "report.html"
        report["report_html"] = write_page(page, lambda: render_seeds(report, [reports[f"seed-{s}"] for s in seeds]))
        if "error" in report["report_html"]:
            self.progress.info(f"warning: report.html not written: {report['report_html']['error']}")
        path = self.run_dir / "report.json"
        write_json(path, report)
        metrics = {f"seeds/{key}/{stat}": value[stat] for key, value in found["summary"].items()
                   for stat in ("mean", "std")}
        metrics.update({f"seeds/gain/{key}/{stat}": value[stat] for key, value in
                        found.get("baseline", {}).get("gain", {}).items() for stat in ("mean", "std")})
        metrics.update({f"gate/{name}": g["value"] for name, g in gates.items() if g["value"] is not None})
        self.tracker.log_metrics(metrics)
        self.tracker.log_artifact(self.run_dir / "pipeline.yaml")
        self.tracker.log_artifact(path)
        if "error" not in report["report_html"]:
            self.tracker.log_artifact(page)
        self.tracker.set_tags({"kdpipe.status": report["status"],
                               "kdpipe.registered_seed": str(found["registered"]["seed"])})
        self.tracker.end("FINISHED" if passed else "FAILED")
        self.ledger["report"] = {**self.ledger["report"], "status": report["status"]}
        self.save_ledger()
        return report

    def end_badly(self, exc: BaseException) -> None:
        """The parent's record of a run that failed or was killed in one of its seeds' runs (which recorded its
        own end): report.json with the step, MLflow status KILLED or FAILED."""
        killed = isinstance(exc, (RunInterrupted, KeyboardInterrupt))
        report = {**self.ledger["report"], "status": "killed" if killed else "failed", "failed_stage": self.step,
                  "error": exc.format(None) if isinstance(exc, InputError) else str(exc) or type(exc).__name__,
                  "seeds": {"seeds": self.pipeline.seeds, "finished": self.ledger["finished"]}}
        attempts = [lambda: write_json(self.run_dir / "report.json", report),
                    lambda: self.tracker.set_tags({"kdpipe.status": report["status"],
                                                   "kdpipe.failed_stage": self.step}),
                    lambda: self.tracker.end("KILLED" if killed else "FAILED")]
        for attempt in attempts:
            try:
                attempt()
            except Exception as error:  # noqa: BLE001 - the run's own error is the one to report
                self.progress.info(f"the multi-seed run's end could not be recorded: {type(error).__name__}: {error}")

