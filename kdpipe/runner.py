"""Stage order, the run context, timings, the report and exit codes.

Everything that can reject the user's input (the pipeline file, data files,
models, checkpoints) is checked in `prepare`, before a run directory or an
MLflow run exists, so invalid input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import __version__, distributed
from kdpipe.atomic import write_json
from kdpipe.cache_store import check_cache_dir
from kdpipe.pipeline import Pipeline, load_pipeline
from kdpipe.data import Splits, load_data
from kdpipe.data.storage import available_bytes
from kdpipe.errors import GateFailed, InputError, RunInterrupted, StageFailed
from kdpipe.locks import Busy, file_lock
from kdpipe.methods import get_method
from kdpipe.models import build_model, load_checkpoint
from kdpipe.models.adapter import check_uint8_input, holds_8bit_images
from kdpipe.progress import Progress
from kdpipe.resume import check_resumed, check_until, read_ledger, run_record, write_record
from kdpipe.search.storage import check_storage_location
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.teacher_views import views_nbytes
from kdpipe.tracking import (Tracker, TrackingUnreachable, check_reachable, http_uris, load_tracking_config,
                             unreachable_reason)
from kdpipe.train import TrainerSettings, resolve_precision
from kdpipe.versions import versions

STAGES = ["teacher", "search", "distill", "export", "validate", "register"]
MAIN_RANK_STAGES = {"export", "validate", "register"}  # under torchrun, ranks other than 0 stop after training
VALIDATE_STAGES = ["teacher", "export", "validate"]  # `kdpipe validate MODEL.onnx`: a given model, no training
RUN_LOCK = "run.lock"  # held by the process working in a run directory
STOPPED_AFTER_TAG = "kdpipe.stopped_after"


@dataclass
class Gate:
    name: str
    value: float | None
    limit: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "limit": self.limit, "passed": self.passed}


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
    artifacts: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
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

    def add_gate(self, name: str, value: float | None, limit: float, passed: bool) -> None:
        self.gates.append(Gate(name, value, limit, passed))
        if value is not None:
            self.tracker.log_metrics({f"gate/{name}": float(value)})

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def log_epoch(self, label: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({f"{label}/{k}": v for k, v in metrics.items()}, step=epoch)
        self.progress.epoch(label, epoch, epochs, metrics)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("distill.device", f"'{name}' was asked for but torch sees no CUDA device")
    if name == "cuda" and distributed.from_environment().enabled:
        name = f"cuda:{distributed.from_environment().local_rank}"  # torchrun: one GPU per process
    return torch.device(name)


class SilentTracker:
    """The tracker of ranks other than 0 under torchrun: they train, rank 0 alone talks to MLflow."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class ResumedTracker:
    """A Tracker continuing an interrupted MLflow run: metric steps the run already holds are not logged again."""

    def __init__(self, tracker: Tracker, run_id: str):
        tracker.resume(run_id)
        client = tracker.client()
        self.tracker = tracker
        run = client.get_run(run_id)
        self.logged = {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
        if STOPPED_AFTER_TAG in run.data.tags:  # an earlier `--until` stopped it; this invocation goes on
            client.delete_tag(run_id, STOPPED_AFTER_TAG)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if (step or 0) > self.logged.get(k, -1)}
        if fresh:
            self.tracker.log_metrics(fresh, step=step)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


@contextlib.contextmanager
def lock_run_dir(run_dir: Path):
    """Hold the run directory for this process: a second process resuming it at the same time would train and log
    the same stages twice. InputError (exit 2) when another process holds it."""
    try:
        with file_lock(Path(run_dir) / RUN_LOCK, wait=False):
            yield
    except Busy as busy:
        raise InputError("--resume", f"{run_dir} is in use by another kdpipe process (pid {busy.holder or 'unknown'}); "
                                     "wait for it to end") from None


@contextlib.contextmanager
def signals_interrupt_the_run():
    """SIGTERM and SIGINT raise RunInterrupted in the main thread, so the run's failure handler records the run as
    killed (report.json, MLflow status KILLED) instead of the process vanishing with its MLflow run RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    watched = (signal.SIGTERM, signal.SIGINT)

    def interrupt(signum, frame):
        for number in watched:  # the handler's cleanup runs once, uninterrupted by a repeated signal
            signal.signal(number, signal.SIG_IGN)
        raise RunInterrupted(signum)

    previous = {number: signal.signal(number, interrupt) for number in watched}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass
class Prepared:
    pipeline: Pipeline
    data: Splits
    teacher: nn.Module | None
    student: nn.Module
    device: torch.device


def prepare(pipeline_file: Path, overrides: list[str], check_models: bool = True) -> Prepared:
    """Validate the pipeline file and every input it names; raises InputError (exit 2).

    `check_models=False` skips the method's checks of the built models (`kdpipe taps` lists layers even when
    the configured taps are wrong).
    """
    pipeline = load_pipeline(pipeline_file, overrides)
    torch.manual_seed(pipeline.seed)
    device = pick_device(pipeline.distill.device)
    resolve_precision(pipeline.distill.precision, device)
    data = load_data(pipeline.data, pipeline.seed, device)
    check_trainable(pipeline, data)
    check_sizes(pipeline, data, device)
    if pipeline.export.input == "uint8":
        check_uint8_input(data)
    teacher = None
    if pipeline.teacher is not None:
        teacher = build_model(pipeline.teacher.model, "teacher.model", data.input_shape, data.num_classes)
        if pipeline.teacher.checkpoint is not None:
            load_checkpoint(teacher, pipeline.teacher.checkpoint, "teacher.checkpoint")
    torch.manual_seed(pipeline.seed + 1)
    student = build_model(pipeline.student.model, "student.model", data.input_shape, data.num_classes)
    # Tap paths and shapes the method compares are checked here, with a dry pass, before any run starts.
    if check_models:
        get_method(pipeline.distill.method).check_models(pipeline, student=student, teacher=teacher, input_shape=data.input_shape)
        if pipeline.export.quantize == "qat":
            from kdpipe.qat import check_quantizable

            check_quantizable(pipeline, student, teacher, data.num_classes, data.input_shape)
    return Prepared(pipeline, data, teacher, student, device)


def check_trainable(pipeline: Pipeline, data: Splits) -> None:
    """Inputs that would make a run train nothing, found before any work (InputError, exit 2)."""
    if pipeline.distill.epochs == 0:
        raise InputError("distill.epochs", "expected ≥ 1: with 0 epochs the student is never trained")
    teacher = pipeline.teacher
    given = teacher is not None and (teacher.checkpoint is not None or teacher.model.weights is not None
                                     or (teacher.model.arch or "").startswith("hf:"))
    if teacher is not None and not given and teacher.train.epochs == 0:
        raise InputError("teacher.train.epochs", "expected ≥ 1 when the teacher is trained (no checkpoint or weights "
                                                 "given): with 0 epochs the teacher is never trained")
    # A checkpoint replaces the whole teacher, head included; weights or hf: with reset_head keep a random head.
    if teacher is not None and teacher.checkpoint is None and teacher.model.reset_head and teacher.train.epochs == 0:
        raise InputError("teacher.train.epochs", "expected ≥ 1 with teacher.model.reset_head true: a classifier it "
                                                 "replaces starts random and 0 epochs never train it; set reset_head: "
                                                 "false where the weights already classify the data's "
                                                 f"{data.num_classes} classes")
    # The trainer skips batches with fewer than 2 samples per process (BatchNorm cannot train on one sample).
    ranks = distributed.from_environment().world_size
    if pipeline.data.batch_size < 2 * ranks and len(data.y_train) >= 2 * ranks:
        raise InputError("data.batch_size", f"expected ≥ {2 * ranks}: a batch of {pipeline.data.batch_size} gives fewer "
                                            f"than 2 samples to each of {ranks} process(es), and the trainer skips such "
                                            "batches (BatchNorm cannot train on one sample), so no step would be made")


def check_sizes(pipeline: Pipeline, data: Splits, device: torch.device) -> None:
    """Sizes the schema cannot bound without the data, found before any work (InputError, exit 2): each crop's
    padding against the images, the teacher views against the memory of the device that computes them."""
    if data.augmentation is None:
        return
    _, height, width = data.input_shape
    for i, step in enumerate(pipeline.data.augment):
        # Beyond the image's side a crop can miss the image altogether (and reflect padding cannot reach).
        if step.name == "random_crop" and step.params.padding >= min(height, width):
            raise InputError(f"data.augment.{i}.random_crop.padding",
                             f"expected at most {min(height, width) - 1} for {height}×{width} images (less than their "
                             f"smaller side, so that every crop keeps part of the image), got {step.params.padding}")
    cfg = pipeline.distill
    method = get_method(cfg.method)
    if pipeline.teacher is None or cfg.teacher_cache == "off" or not (method.teacher_soft_labels and method.cache_teacher):
        return  # no teacher views are recorded: the teacher runs online (Trainer.teacher)
    per_view = views_nbytes(data, 1, cfg.teacher_topk)
    free = available_bytes(device)
    if per_view * cfg.teacher_views > free:
        raise InputError("distill.teacher_views",
                         f"expected at most {free // per_view} views of the {len(data.y_train)} training images on "
                         f"this machine, got {cfg.teacher_views}: they need about "
                         f"{per_view * cfg.teacher_views / 1e9:.0f} GB (augmentation parameters and the teacher's "
                         f"top-{min(cfg.teacher_topk, data.num_classes)} soft labels), all held in memory while the "
                         f"teacher pass makes them, and {device} has {free / 1e9:.1f} GB free")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def run_pipeline(pipeline_file: Path, overrides: list[str], runs_dir: Path, cache_dir: Path | None = None,
                 mlflow_config: Path | None = None, until: str | None = None, resume: Path | None = None,
                 onnx_model: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Run every stage (through `until` when given); return (report path, report).

    The search stage runs only when the pipeline has a `search:` section.
    `until`: stop after this stage; the report says status "stopped" and "stopped_after", and `resume` continues.
    `resume`: the run directory of an interrupted or stopped run. Its finished stages are restored (each stage's
    optional `restore(ctx)`), not re-run; the others continue in the same MLflow run, training from the last epoch
    checkpoint, and metric steps already logged are not logged twice. The run directory is locked while a process
    works in it.
    Under torchrun every rank trains; ranks other than 0 return (None, report) after the training stages.
    `onnx_model`: validate this ONNX classifier against the pipeline's data and gates instead of training one.
    Raises InputError, GateFailed, StageFailed, TrackingUnreachable or RunInterrupted (SIGTERM, SIGINT).
    """
    if until is not None and until not in STAGES:
        raise InputError("--until", f"expected one of {', '.join(STAGES)}, got '{until}'")
    check_cache_dir(cache_dir, runs_dir if resume is None else None)  # resumed: the one its ledger names, unless named
    with contextlib.ExitStack() as held:
        ledger: dict[str, Any] = {"finished": []}
        if resume is not None:
            read_ledger(resume)  # a run directory, before a lock file is made in it
            if distributed.from_environment().is_main:
                held.enter_context(lock_run_dir(resume))
            ledger = read_ledger(resume)  # as the last process that worked in it left it
            check_until(ledger, until, STAGES)
            pipeline_file, overrides = Path(resume) / "pipeline.yaml", []
        prepared = prepare(pipeline_file, overrides)
        if resume is not None:
            check_resumed(ledger, prepared.pipeline, prepared.data, Path(resume))
        search = prepared.pipeline.search
        if search is not None and resume is None:  # checked once, when the run starts
            check_storage_location(search.storage, overrides,
                                   Path(cache_dir or os.environ.get("KDPIPE_CACHE_DIR") or Path(runs_dir) / ".cache"))
            ledger["search_storage"] = search.storage  # pipeline.yaml masks its password; the resumed run needs it
        elif search is not None and ledger.get("search_storage"):
            search.storage = ledger["search_storage"]
        if until == "search" and prepared.pipeline.search is None:
            raise InputError("--until", "the pipeline has no search: section, so no search stage to stop after")
        tracking = load_tracking_config(mlflow_config)
        from kdpipe.onnx_runtime import import_ort

        try:
            import_ort()
        except RuntimeError as exc:
            raise InputError("", str(exc)) from None
        if onnx_model is not None:
            from kdpipe.onnx_runtime import check_classifier

            check_classifier(onnx_model, prepared.data.input_shape, prepared.data.num_classes,
                             prepared.pipeline.validation.batch_sizes, "MODEL", holds_8bit_images(prepared.data))

        env = distributed.init(prepared.device)
        try:
            with signals_interrupt_the_run():
                return _run_stages(prepared, pipeline_file, runs_dir, cache_dir, tracking, until, resume, ledger, env,
                                   held, onnx_model, mlflow_config)
        finally:
            distributed.shutdown()


def _run_stages(prepared: Prepared, pipeline_file: Path, runs_dir: Path, cache_dir: Path | None, tracking,
                until: str | None, resume: Path | None, ledger: dict[str, Any], env: distributed.DistEnv,
                held: contextlib.ExitStack, onnx_model: Path | None = None,
                mlflow_config: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    pipeline = prepared.pipeline
    resolved = pipeline.resolved()
    ledger.update(run_record(pipeline, prepared.data))  # an earlier release's ledger gains it too
    if resume is not None:
        run_dir = Path(resume).resolve()
        runs_dir, run_id = run_dir.parent.parent, run_dir.name
    else:
        runs_dir = Path(runs_dir).resolve()
        run_id = distributed.broadcast_object(new_run_id())  # every rank uses rank 0's run directory
        run_dir = runs_dir / pipeline.name / run_id
        if env.is_main:
            run_dir.mkdir(parents=True)
            held.enter_context(lock_run_dir(run_dir))
            write_record(run_dir, pipeline)
    progress = Progress() if env.is_main else Progress(open(os.devnull, "w"))
    cache_dir = Path(cache_dir or os.environ.get("KDPIPE_CACHE_DIR") or ledger.get("cache_dir") or runs_dir / ".cache")
    data = prepared.data.to(prepared.device)
    report_path = run_dir / "report.json"
    resume_command = f"kdpipe run --resume {run_dir}" + (f" --mlflow-config {mlflow_config}" if mlflow_config else "")
    if resume is not None:
        report = {**ledger["report"], "status": "running", "resumed": ledger["report"].get("resumed", 0) + 1}
    else:
        report = _new_report(pipeline, run_dir, run_id, data, prepared.device, tracking)
    gates: list[Gate] = [Gate(**g) for g in ledger.get("gates", [])]
    stages = STAGES[:STAGES.index(until) + 1] if until else STAGES
    if onnx_model is not None:
        stages = VALIDATE_STAGES
    stages = [s for s in stages if s != "search" or pipeline.search is not None]
    stopped_after = until if until is not None and until != STAGES[-1] and onnx_model is None else None

    tracker = None
    stage = "setup"  # the part of the run in progress, named in the report when the run ends badly
    try:
        with contextlib.ExitStack() as run_scope:
            if env.is_main:
                check_reachable(tracking)
                for uri in http_uris(tracking):
                    run_scope.enter_context(progress.http_retries(uri))
            tracker = Tracker(tracking) if env.is_main else SilentTracker()
            if resume is not None:
                if env.is_main:
                    tracker = ResumedTracker(tracker, ledger["mlflow_run_id"])
            else:
                report["mlflow"]["run_id"] = _start_mlflow_run(tracker, pipeline, run_dir, run_id, resolved)
            ctx = RunContext(
                pipeline=pipeline, pipeline_file=Path(pipeline_file), run_dir=run_dir, cache_dir=cache_dir, data=data,
                device=prepared.device,
                teacher=prepared.teacher.to(prepared.device) if prepared.teacher is not None else None,
                student=prepared.student.to(prepared.device), tracker=tracker, progress=progress, report=report,
                gates=gates,
                teacher_cache=TeacherOutputCache(cache_dir / "teacher-outputs", pipeline.distill.teacher_cache_memory_mb),
                dist=env,
            )
            if resume is not None:
                ctx.artifacts = {k: Path(v["path"]) if "path" in v else v["value"] for k, v in ledger["artifacts"].items()}
            if onnx_model is not None:
                ctx.artifacts["given_onnx"] = Path(onnx_model).resolve()

            def save_ledger() -> None:
                if env.is_main:
                    write_json(run_dir / "ledger.json", {
                        **ledger, "mlflow_run_id": ctx.report["mlflow"]["run_id"], "cache_dir": str(ctx.cache_dir),
                        "report": ctx.report, "gates": [asdict(g) for g in ctx.gates],
                        "artifacts": {k: v for k, v in map(_ledger_artifact, ctx.artifacts.items()) if v is not None},
                    }, private=True)  # it holds the search storage URL with its password

            if resume is None:  # a resumed run's ledger is already on disk; a read-only one must still end truthfully
                save_ledger()
            for stage in stages:
                if stage in MAIN_RANK_STAGES and not env.is_main:
                    continue
                module = importlib.import_module(f"kdpipe.stages.{stage}")
                if stage in ledger["finished"]:
                    if hasattr(module, "restore"):
                        module.restore(ctx)
                    continue
                start = time.perf_counter()
                with progress.stage(stage):
                    try:
                        module.run(ctx)
                    except (InputError, GateFailed):
                        raise
                    except Exception as exc:
                        raise StageFailed(stage, exc) from exc
                seconds = time.perf_counter() - start
                ctx.report["stage_seconds"][stage] = round(seconds, 3)
                tracker.log_metrics({f"stage_seconds/{stage}": seconds})
                ledger["finished"].append(stage)
                if ctx.pipeline is not pipeline and env.is_main:  # the search chose what distill trains
                    pipeline = ctx.pipeline
                    write_record(run_dir, pipeline)
                    ledger.update(run_record(pipeline, data))
                save_ledger()
            stage = "report"
            if not env.is_main:
                return None, ctx.report
            ctx.report["gates"] = {g.name: g.as_dict() for g in ctx.gates}
            if stopped_after is not None:
                ctx.report.update(status="stopped", stopped_after=stopped_after)
            else:
                ctx.report.pop("stopped_after", None)
                ctx.report["status"] = "passed" if ctx.gates_passed else "failed"
            write_json(report_path, ctx.report)
            tracker.log_artifact(run_dir / "pipeline.yaml")
            tracker.log_artifact(report_path)
            tracker.set_tags({"kdpipe.status": ctx.report["status"],
                              **({STOPPED_AFTER_TAG: stopped_after} if stopped_after is not None else {})})
            tracker.end("FINISHED" if ctx.gates_passed or stopped_after is not None else "FAILED")
    except BaseException as exc:
        if not env.is_main:
            raise
        raised = _end_badly(exc, stage, report_path, report, gates, tracker, tracking, progress,
                            resume_command if (run_dir / "ledger.json").is_file() else None)
        if raised is exc:
            raise
        raise raised from exc
    progress.gate_table(ctx.gates)
    return report_path, ctx.report


def _end_badly(exc: BaseException, stage: str, report_path: Path, report: dict[str, Any], gates: list[Gate],
               tracker, tracking, progress: Progress, resume_command: str | None) -> BaseException:
    """Record a run that failed or was killed: report.json (where the disk allows, else as an MLflow artifact),
    the MLflow run's status FAILED or KILLED, and the error the CLI shows. Each record is attempted on its own, so a
    full disk or a server that is down does not keep the others from being made. Returns the exception to raise.

    `resume_command` is None when nothing was started that --resume could continue (the MLflow run never began)."""
    again = f"continue with: {resume_command}" if resume_command else "run again"
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
        down = next(((u, r) for u in http_uris(tracking) if (r := unreachable_reason(u, tracking.connect_timeout_s))),
                    None)
        if down is not None:
            exc = StageFailed(stage, TrackingUnreachable(
                f"MLflow server {down[0]} stopped answering ({down[1]}); when it is back, {again}"))
    report.update(status="killed" if killed else "failed", failed_stage=stage,
                  error=exc.format(None) if isinstance(exc, InputError) else str(exc) or type(exc).__name__,
                  gates={g.name: g.as_dict() for g in gates})
    report.pop("stopped_after", None)
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


def _ledger_artifact(item: tuple[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """An artifact as the ledger keeps it: paths and plain data; live objects (caches) are not kept."""
    key, value = item
    if isinstance(value, Path):
        return key, {"path": str(value)}
    try:
        json.dumps(value)
    except TypeError:
        return key, None
    return key, {"value": value}


def _new_report(pipeline: Pipeline, run_dir: Path, run_id: str, data: Splits, device: torch.device,
                tracking) -> dict[str, Any]:
    return {
        "status": "running",
        "name": pipeline.name,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "method": {"name": pipeline.distill.method, "params": pipeline.distill.params.model_dump(mode="json")},
        "data": {"source": pipeline.data.source, **data.sizes(), "num_classes": data.num_classes,
                 "provenance": data.provenance},
        "device": str(device),
        "versions": versions(),
        "stage_seconds": {},
        "mlflow": {"tracking_uri": tracking.tracking_uri, "experiment": tracking.experiment, "run_id": None,
                   "model_name": None, "model_version": None, "alias": None},
    }


def _start_mlflow_run(tracker, pipeline: Pipeline, run_dir: Path, run_id: str, resolved: dict[str, Any]) -> str | None:
    mlflow_run_id = tracker.start(f"{pipeline.name}-{run_id}", {"kdpipe.version": __version__,
                                                                "kdpipe.run_dir": str(run_dir),
                                                                "kdpipe.method": pipeline.distill.method})
    tracker.log_params(resolved)
    return mlflow_run_id
