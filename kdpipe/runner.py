"""Stage order, the run context, timings, the records of a run and exit codes.

Everything that can reject the user's input is checked in `prepare` (kdpipe.prepare), before a run directory or an
MLflow run exists, so invalid input leaves nothing behind. The stages are `kdpipe.stages.STAGES`, in run order; each
returns a frozen result (kdpipe.results) that the runner keeps on `ctx.results`, and from which report.json and
ledger.json are rendered (kdpipe.report).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import __version__, distributed, gc_tuning
from kdpipe.atomic import atomic_write, write_json
from kdpipe.cache_store import check_cache_dir
from kdpipe.data import Splits
from kdpipe.errors import GateFailed, InputError, RunInterrupted, StageFailed
from kdpipe.models.adapter import holds_8bit_images
from kdpipe.pipeline import Pipeline
from kdpipe.prepare import Prepared, prepare
from kdpipe.progress import Progress
from kdpipe.report import new_report, render_gates_markdown, render_ledger, render_report
from kdpipe.results import Results, Stage, StageResult
from kdpipe.resume import check_resumed, check_until, read_ledger, run_record, write_record
from kdpipe.run_scope import (STOPPED_AFTER_TAG, ResumedTracker, SilentTracker, lock_run_dir, new_run_id,
                              signals_interrupt_the_run)
from kdpipe.search.storage import check_storage_location
from kdpipe.stages import STAGES
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.tracking import (Tracker, TrackingUnreachable, check_reachable, http_uris, load_tracking_config,
                             unreachable_reason)
from kdpipe.train import TrainerSettings

STAGE_NAMES = [s.name for s in STAGES]  # --until's choices
NAME_OF_RESULT = {s.produces: s.name for s in STAGES}


@dataclass
class RunContext:
    pipeline: Pipeline
    pipeline_file: Path
    run_dir: Path
    cache_dir: Path
    data: Splits
    device: torch.device
    teacher: nn.Module | None
    student: nn.Module
    tracker: Tracker
    progress: Progress
    results: Results = field(default_factory=Results)
    resumed: bool = False  # this invocation continues a run (--resume)
    given_onnx: Path | None = None  # `kdpipe validate MODEL.onnx`: the model to validate instead of a trained one
    teacher_cache: TeacherOutputCache = field(default_factory=TeacherOutputCache)
    dist: distributed.DistEnv = field(default_factory=distributed.DistEnv)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes the run directory and caches."""
        return self.dist.is_main

    def trainer_options(self, stage: str) -> TrainerSettings:
        """The stage's TrainerSettings from the pipeline: the shared teacher-output cache, and per-epoch
        checkpoints in the run directory so that `--resume` continues the stage's training."""
        return TrainerSettings.of(self.pipeline.distill, teacher_cache=self.teacher_cache,
                                  checkpoint_dir=self.run_dir / "checkpoints" / stage, student=stage != "teacher")

    def log_epoch(self, label: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({f"{label}/{k}": v for k, v in metrics.items()}, step=epoch)
        self.progress.epoch(label, epoch, epochs, metrics)

    def log_epoch_into(self, history: dict[str, dict[str, list]]):
        """log_epoch that also keeps each epoch's training loss parts and validation accuracy in `history` (label →
        {"epoch": [...], metric: [...]}), report.json's learning curves. A stage resumed after epoch 1 starts its
        history with the epochs its MLflow run recorded before the interruption."""
        def keep(columns: dict[str, list], epoch: int, metrics: dict[str, float]) -> None:
            row = {"epoch": epoch, **{k: v for k, v in metrics.items() if k.startswith(("train_", "val_accuracy"))}}
            done = len(columns.get("epoch", []))
            for key in [*columns, *(k for k in row if k not in columns)]:  # None where an epoch lacks a metric
                columns.setdefault(key, [None] * done).append(row.get(key))

        def on_epoch(label: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
            self.log_epoch(label, epoch, epochs, metrics)
            if label not in history and epoch > 1:  # resumed: the epochs before are in the MLflow run only
                for earlier, logged in (self.tracker.logged_epochs(label, before=epoch) or {}).items():
                    keep(history.setdefault(label, {}), earlier, logged)
            keep(history.setdefault(label, {}), epoch, metrics)
        return on_epoch


def stages_to_run(pipeline: Pipeline, until: str | None, given_model: bool) -> list[Stage]:
    """The stages this run runs, in order: those the pipeline has (search only with `search:`), through `until`."""
    chosen = [s for s in STAGES if s.applies(pipeline) and (s.for_given_model or not given_model)]
    if until is not None and not given_model:
        chosen = chosen[:[s.name for s in chosen].index(until) + 1]
    return chosen


@dataclass(frozen=True)
class Nest:
    """Where one seed's run of a multi-seed run (kdpipe.seeds) goes: its run directory inside the parent's, its MLflow
    run nested under the parent's, and the command that continues the whole multi-seed run."""

    run_dir: Path
    run_id: str
    parent_run_id: str
    seed: int
    resume_command: str


def run_pipeline(pipeline_file: Path, overrides: list[str], runs_dir: Path, cache_dir: Path | None = None,
                 mlflow_config: Path | None = None, until: str | None = None, resume: Path | None = None,
                 onnx_model: Path | None = None, nest: Nest | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Run every stage (through `until` when given); return (report path, report).

    The search stage runs only when the pipeline has a `search:` section.
    `until`: stop after this stage; the report says status "stopped" and "stopped_after", and `resume` continues.
    `resume`: the run directory of an interrupted or stopped run. Its finished stages' results are read back from
    its ledger (each stage's `restore` rebuilds what they do not hold), not re-run; the others continue in the same
    MLflow run, training from the last epoch checkpoint, and metric steps already logged are not logged twice.
    The run directory is locked while a process works in it.
    Under torchrun every rank trains; ranks other than 0 return (None, report) after the training stages.
    `onnx_model`: validate this ONNX classifier against the pipeline's data and gates instead of training one.
    A pipeline with `seeds` is refused: kdpipe.launch runs it (kdpipe.seeds), placing each seed's run with `nest`.
    Raises InputError, GateFailed, StageFailed, TrackingUnreachable or RunInterrupted (SIGTERM, SIGINT).
    """
    if until is not None and until not in STAGE_NAMES:
        raise InputError("--until", f"expected one of {', '.join(STAGE_NAMES)}, got '{until}'")
    check_cache_dir(cache_dir, runs_dir if resume is None else None)  # resumed: the one its ledger names, unless named
    with contextlib.ExitStack() as held:
        ledger: dict[str, Any] = {"finished": []}
        if resume is not None:
            read_ledger(resume)  # a run directory, before a lock file is made in it
            if distributed.from_environment().is_main:
                held.enter_context(lock_run_dir(resume))
            ledger = read_ledger(resume)  # as the last process that worked in it left it
            if ledger.get("seeds_parent") and nest is None:
                raise InputError("--resume", f"{resume} is one run of the multi-seed run {ledger['seeds_parent']}; "
                                             f"continue that: kdpipe run --resume {ledger['seeds_parent']}")
            check_until(ledger, until, STAGE_NAMES)
            pipeline_file, overrides = Path(resume) / "pipeline.yaml", []
        prepared = prepare(pipeline_file, overrides)
        if prepared.pipeline.seeds is not None and onnx_model is None:
            raise InputError("seeds", "a multi-seed pipeline runs through kdpipe.launch.launch (as `kdpipe run` "
                                      "does), once per seed under one parent run")
        if resume is not None:
            ledger.update(check_resumed(ledger, prepared.pipeline, prepared.data, Path(resume)))
        else:
            ledger.update(run_record(prepared.pipeline, prepared.data))
        _check_search(prepared.pipeline, ledger, until, resume, overrides, runs_dir, cache_dir)
        tracking = load_tracking_config(mlflow_config)
        _check_runtime(prepared, onnx_model)
        env = distributed.init(prepared.device)
        try:
            with signals_interrupt_the_run():
                run = _Run.open(prepared, pipeline_file, runs_dir, cache_dir, tracking, resume, ledger, env, held,
                                mlflow_config, nest)
                return run.go(stages_to_run(prepared.pipeline, until, onnx_model is not None),
                              until if until not in (None, STAGE_NAMES[-1]) and onnx_model is None else None,
                              onnx_model)
        finally:
            distributed.shutdown()


def _check_search(pipeline: Pipeline, ledger: dict[str, Any], until: str | None, resume: Path | None,
                  overrides: list[str], runs_dir: Path, cache_dir: Path | None) -> None:
    search = pipeline.search
    if search is not None and resume is None:  # checked once, when the run starts
        check_storage_location(search.storage, overrides,
                               Path(cache_dir or os.environ.get("KDPIPE_CACHE_DIR") or Path(runs_dir) / ".cache"))
        ledger["search_storage"] = search.storage  # pipeline.yaml masks its password; the resumed run needs it
    elif search is not None and ledger.get("search_storage"):
        search.storage = ledger["search_storage"]
    if until == "search" and search is None:
        raise InputError("--until", "the pipeline has no search: section, so no search stage to stop after")


def _check_runtime(prepared: Prepared, onnx_model: Path | None) -> None:
    from kdpipe.onnx_runtime import check_classifier, import_ort

    try:
        import_ort()
    except RuntimeError as exc:
        raise InputError("", str(exc)) from None
    if onnx_model is not None:
        check_classifier(onnx_model, prepared.data.input_shape, prepared.data.num_classes,
                         prepared.pipeline.validation.batch_sizes, "MODEL", holds_8bit_images(prepared.data))


@dataclass
class _Run:
    """One invocation working in a run directory: its records (the ledger's, the report's own part, the results)
    and what it talks to."""

    prepared: Prepared
    pipeline_file: Path
    run_dir: Path
    run_id: str
    cache_dir: Path
    ledger: dict[str, Any]  # finished stages, digests, search storage: what --resume reads besides the results
    base: dict[str, Any]  # the run's own part of report.json
    results: Results
    tracking: Any
    env: distributed.DistEnv
    progress: Progress
    resume_command: str
    resumed: bool
    stage: str = "setup"  # the part of the run in progress, named in the report when the run ends badly
    tracker: Any = None
    ctx: RunContext | None = None
    nest: Nest | None = None

    @classmethod
    def open(cls, prepared: Prepared, pipeline_file: Path, runs_dir: Path, cache_dir: Path | None, tracking,
             resume: Path | None, ledger: dict[str, Any], env: distributed.DistEnv, held: contextlib.ExitStack,
             mlflow_config: Path | None, nest: Nest | None = None) -> _Run:
        """The run directory (made and locked, or the resumed one) and the records the run starts from."""
        pipeline = prepared.pipeline
        if resume is not None:
            run_dir = Path(resume).resolve()
            runs_dir, run_id = run_dir.parent.parent, run_dir.name
            base = {**ledger["report"], "status": "running", "resumed": ledger["report"].get("resumed", 0) + 1}
            for key in ("gates", "artifacts"):  # the previous layout's, in a ledger of a run that finished no stage
                ledger.pop(key, None)
        else:
            runs_dir = Path(runs_dir).resolve()
            run_id = distributed.broadcast_object(new_run_id())  # every rank uses rank 0's run directory
            run_dir = runs_dir / pipeline.name / run_id
            if nest is not None:
                run_dir, run_id = nest.run_dir, nest.run_id
                ledger["seeds_parent"] = str(run_dir.parent)  # resumed through the parent only
            if env.is_main:
                run_dir.mkdir(parents=True)
                held.enter_context(lock_run_dir(run_dir))
                write_record(run_dir, pipeline)
            base = new_report(pipeline, run_dir, run_id, prepared.data, prepared.device, tracking)
        results = Results()
        for stage in STAGES:  # a resumed run's finished stages, as their results were kept
            if stage.name in ledger.get("results", {}):
                results.add(stage.produces.from_json(ledger["results"][stage.name]))
        cache_dir = Path(cache_dir or os.environ.get("KDPIPE_CACHE_DIR") or ledger.get("cache_dir")
                         or runs_dir / ".cache")
        command = f"kdpipe run --resume {run_dir}" + (f" --mlflow-config {mlflow_config}" if mlflow_config else "")
        return cls(prepared, Path(pipeline_file), run_dir, run_id, cache_dir, ledger, base, results, tracking, env,
                   Progress() if env.is_main else Progress(open(os.devnull, "w")),
                   nest.resume_command if nest is not None else command, resume is not None, nest=nest)

    def go(self, stages: list[Stage], stopped_after: str | None,
           onnx_model: Path | None) -> tuple[Path | None, dict[str, Any]]:
        try:
            with contextlib.ExitStack() as run_scope:
                run_scope.enter_context(gc_tuning.frozen_while_running())
                self._start_tracking(run_scope)
                self.ctx = self._context(onnx_model)
                if not self.resumed:  # a resumed run's ledger is already on disk; a read-only one must end truthfully
                    self.save_ledger()
                for stage in stages:
                    if not stage.main_rank_only or self.env.is_main:
                        self.run_stage(stage)
                self.stage = "report"
                if not self.env.is_main:
                    return None, render_report(self.base, self.results)
                report = self._finish(stopped_after)
        except BaseException as exc:
            if not self.env.is_main:
                raise
            raised = _end_badly(exc, self)
            if raised is exc:
                raise
            raise raised from exc
        self.progress.gate_table(self.results.gates)
        return self.run_dir / "report.json", report

    def _start_tracking(self, run_scope: contextlib.ExitStack) -> None:
        if self.env.is_main:
            check_reachable(self.tracking)
            for uri in http_uris(self.tracking):
                run_scope.enter_context(self.progress.http_retries(uri))
        with gc_tuning.imports_uncollected():  # MLflow and its store: long-lived
            self.tracker = Tracker(self.tracking) if self.env.is_main else SilentTracker()
        if self.resumed:
            if self.env.is_main:
                self.tracker = ResumedTracker(self.tracker, self.ledger["mlflow_run_id"])
        else:
            pipeline = self.prepared.pipeline
            nested = {"mlflow.parentRunId": self.nest.parent_run_id, "kdpipe.seed": str(self.nest.seed)} \
                if self.nest is not None else {}
            self.base["mlflow"]["run_id"] = self.tracker.start(
                f"{pipeline.name}-{self.run_id}", {"kdpipe.version": __version__, "kdpipe.run_dir": str(self.run_dir),
                                                   "kdpipe.method": pipeline.distill.method, **nested})
            self.tracker.log_params(pipeline.resolved())

    def _context(self, onnx_model: Path | None) -> RunContext:
        prepared, device = self.prepared, self.prepared.device
        return RunContext(
            pipeline=prepared.pipeline, pipeline_file=self.pipeline_file, run_dir=self.run_dir,
            cache_dir=self.cache_dir, data=prepared.data.to(device), device=device,
            teacher=prepared.teacher.to(device) if prepared.teacher is not None else None,
            student=prepared.student.to(device), tracker=self.tracker, progress=self.progress, results=self.results,
            resumed=self.resumed, given_onnx=Path(onnx_model).resolve() if onnx_model is not None else None,
            teacher_cache=TeacherOutputCache(self.cache_dir / "teacher-outputs",
                                             prepared.pipeline.distill.teacher_cache_memory_mb),
            dist=self.env)

    def run_stage(self, stage: Stage) -> None:
        """Run one stage, or restore it when a run it resumes finished it; keep its result and record it."""
        ctx = self.ctx
        self.stage = stage.name
        if stage.name in self.ledger["finished"]:
            self.results.add(stage.restore(ctx, self.results[stage.produces]))
            return
        missing = [need.__name__ for need in stage.needs if self.results.get(need) is None]
        if missing:
            raise StageFailed(stage.name, LookupError(f"needs {', '.join(missing)}, which no earlier stage produced"))
        start = time.perf_counter()
        with self.progress.stage(stage.name):
            try:
                self._keep(stage.run(ctx))
            except GateFailed as exc:
                if exc.result is not None:  # the run ends here, its record showing the gate that ended it
                    self._keep(exc.result)
                raise
            except InputError:
                raise
            except Exception as exc:
                raise StageFailed(stage.name, exc) from exc
        seconds = time.perf_counter() - start
        self.base["stage_seconds"][stage.name] = round(seconds, 3)
        self.tracker.log_metrics({f"stage_seconds/{stage.name}": seconds})
        self.ledger["finished"].append(stage.name)
        if ctx.pipeline is not self.prepared.pipeline and self.env.is_main:  # the search chose what distill trains
            self.prepared.pipeline = ctx.pipeline
            write_record(self.run_dir, ctx.pipeline)
            self.ledger.update(run_record(ctx.pipeline, ctx.data))
        self.save_ledger()

    def _keep(self, result: StageResult) -> None:
        self.results.add(result)
        for gate in result.gates:
            if gate.value is not None:
                self.tracker.log_metrics({f"gate/{gate.name}": float(gate.value)})

    def save_ledger(self) -> None:
        if self.env.is_main:
            record = {**self.ledger, "mlflow_run_id": self.base["mlflow"]["run_id"], "cache_dir": str(self.cache_dir)}
            write_json(self.run_dir / "ledger.json", render_ledger(record, self.base, self.results, NAME_OF_RESULT),
                       private=True)  # it holds the search storage URL with its password

    def _finish(self, stopped_after: str | None) -> dict[str, Any]:
        passed = self.results.gates_passed
        ending = {"status": "stopped", "stopped_after": stopped_after} if stopped_after is not None else \
            {"status": "passed" if passed else "failed"}
        report = render_report(self.base, self.results, **ending)
        html = self._write_html(report)
        report_path = self.run_dir / "report.json"
        write_json(report_path, report)
        self.tracker.log_artifact(self.run_dir / "pipeline.yaml")
        self.tracker.log_artifact(report_path)
        if html is not None:
            self.tracker.log_artifact(html)
        if stopped_after is None:  # the gates decided: their table for a CI job's summary
            gates_path = self.run_dir / "gates.md"
            with atomic_write(gates_path) as tmp:
                tmp.write_text(render_gates_markdown(report))
            self.tracker.log_artifact(gates_path)
        self.tracker.set_tags({"kdpipe.status": report["status"],
                               **({STOPPED_AFTER_TAG: stopped_after} if stopped_after is not None else {})})
        self.tracker.end("FINISHED" if passed or stopped_after is not None else "FAILED")
        return report

    def _write_html(self, report: dict[str, Any]) -> Path | None:
        """report.html beside report.json, its rendering time recorded in the report (`report_html`); returns its
        path. A report that cannot be drawn costs a warning line, never the finished run."""
        from kdpipe.html_report import write_report

        report["report_html"] = written = write_report(report, self.run_dir / "report.html", self.ctx.data)
        if "error" in written:
            self.progress.info(f"warning: report.html not written: {written['error']}")
            return None
        return Path(written["path"])


def _end_badly(exc: BaseException, run: _Run) -> BaseException:
    """Record a run that failed or was killed: report.json (where the disk allows, else as an MLflow artifact),
    the MLflow run's status FAILED or KILLED, and the error the CLI shows. Each record is attempted on its own, so a
    full disk or a server that is down does not keep the others from being made. Returns the exception to raise."""
    # Nothing --resume could continue was started when the run directory has no ledger (the MLflow run never began).
    again = f"continue with: {run.resume_command}" if (run.run_dir / "ledger.json").is_file() else "run again"
    stage, tracker, progress = run.stage, run.tracker, run.progress
    killed = isinstance(exc, (RunInterrupted, KeyboardInterrupt))
    if isinstance(exc, RunInterrupted):
        exc.args = (f"killed by {exc.signal_name} during stage '{stage}'; {again}",)
    elif not killed and not isinstance(exc, (InputError, GateFailed, StageFailed, TrackingUnreachable)):
        exc = StageFailed(stage, exc)  # raised by the runner itself (the ledger, the tracker), not by a stage's code
    started = tracker is not None and tracker.run_id is not None
    down = None
    if isinstance(exc, TrackingUnreachable):  # the check before any work
        exc.args = (f"{exc}; when it answers, {again}",)
    elif not killed:  # did the stage fail because the server went away? Then the server is the error to report.
        down = next(((u, r) for u in http_uris(run.tracking)
                     if (r := unreachable_reason(u, run.tracking.connect_timeout_s))), None)
        if down is not None:
            exc = StageFailed(stage, TrackingUnreachable(
                f"MLflow server {down[0]} stopped answering ({down[1]}); when it is back, {again}"))
    report = render_report(run.base, run.results, status="killed" if killed else "failed", failed_stage=stage,
                           error=exc.format(None) if isinstance(exc, InputError) else str(exc) or type(exc).__name__)
    report_path = run.run_dir / "report.json"
    written = True
    try:
        write_json(report_path, report)
    except OSError as error:
        written = False
        progress.info(f"report.json could not be written to the run directory: {error}")
    if tracker is None:
        return exc
    attempts = [lambda: tracker.end("KILLED" if killed else "FAILED")]
    if started and down is None:
        record_report = (lambda: tracker.log_artifact(report_path)) if written else \
            (lambda: tracker.log_dict(report, "report.json"))
        attempts = [record_report, lambda: tracker.set_tags({"kdpipe.status": report["status"],
                                                            "kdpipe.failed_stage": stage}), *attempts]
    for attempt in attempts:
        try:
            attempt()
        except Exception as error:  # noqa: BLE001 - the run's own error is the one to report
            progress.info(f"MLflow could not record the run's end: {type(error).__name__}: {error}")
    return exc
