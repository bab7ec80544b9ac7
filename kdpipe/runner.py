"""Stage order, the run context, timings, the report and exit codes.

Everything that can reject the user's input (the pipeline file, data files,
models, checkpoints) is checked in `prepare`, before a run directory or an
MLflow run exists, so invalid input leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdpipe import __version__, distributed
from kdpipe.atomic import write_json
from kdpipe.config import Pipeline, load_pipeline
from kdpipe.data import Splits, load_data
from kdpipe.errors import GateFailed, InputError, StageFailed
from kdpipe.methods import get_method
from kdpipe.models import build_model, load_checkpoint
from kdpipe.progress import Progress
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.tracking import Tracker, load_tracking_config
from kdpipe.train import resolve_precision

STAGES = ["teacher", "search", "distill", "export", "validate", "register"]
MAIN_RANK_STAGES = {"export", "validate", "register"}  # under torchrun, ranks other than 0 stop after training
VALIDATE_STAGES = ["teacher", "export", "validate"]  # `kdpipe validate MODEL.onnx`: a given model, no training


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

    def trainer_options(self, stage: str) -> dict[str, Any]:
        """Trainer keywords from the pipeline: precision, compile, the shared teacher-output cache, and
        per-epoch checkpoints in the run directory so that `--resume` continues the stage's training."""
        cfg = self.pipeline.distill
        return {"teacher_cache": self.teacher_cache, "precision": cfg.precision, "compile_model": cfg.compile,
                "teacher_online": cfg.teacher_cache == "off", "checkpoint_dir": self.run_dir / "checkpoints" / stage}

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
        tracker.mlflow.start_run(run_id=run_id)
        tracker.run_id = run_id
        client = tracker.client()
        self.tracker = tracker
        self.logged = {key: max(m.step for m in client.get_metric_history(run_id, key))
                       for key in client.get_run(run_id).data.metrics}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if (step or 0) > self.logged.get(k, -1)}
        if fresh:
            self.tracker.log_metrics(fresh, step=step)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


def read_ledger(run_dir: Path) -> dict[str, Any]:
    """The stage ledger of a run directory, for --resume."""
    try:
        ledger = json.loads((Path(run_dir) / "ledger.json").read_text())
        if not isinstance(ledger.get("finished"), list) or not ledger.get("mlflow_run_id"):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise InputError("--resume", f"{run_dir} is not a kdpipe run directory: no readable ledger.json") from None
    return ledger


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
    return Prepared(pipeline, data, teacher, student, device)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def run_pipeline(pipeline_file: Path, overrides: list[str], runs_dir: Path, cache_dir: Path | None = None,
                 mlflow_config: Path | None = None, until: str | None = None, resume: Path | None = None,
                 onnx_model: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Run every stage (through `until` when given); return (report path, report).

    The search stage runs only when the pipeline has a `search:` section.
    `resume`: the run directory of an interrupted run. Its finished stages are restored (each stage's optional
    `restore(ctx)`), not re-run; the others continue in the same MLflow run, training from the last epoch
    checkpoint, and metric steps already logged are not logged twice.
    Under torchrun every rank trains; ranks other than 0 return (None, report) after the training stages.
    `onnx_model`: validate this ONNX classifier against the pipeline's data and gates instead of training one.
    Raises InputError, GateFailed or StageFailed.
    """
    ledger: dict[str, Any] = {"finished": []}
    if resume is not None:
        ledger = read_ledger(resume)
        pipeline_file, overrides = Path(resume) / "pipeline.yaml", []
    prepared = prepare(pipeline_file, overrides)
    tracking = load_tracking_config(mlflow_config)
    from kdpipe.onnx_runtime import import_ort

    try:
        import_ort()
    except RuntimeError as exc:
        raise InputError("", str(exc)) from None
    if onnx_model is not None:
        from kdpipe.onnx_runtime import check_classifier

        check_classifier(onnx_model, prepared.data.input_shape, prepared.data.num_classes,
                         prepared.pipeline.validation.batch_sizes, "MODEL")

    env = distributed.init(prepared.device)
    try:
        return _run_stages(prepared, pipeline_file, runs_dir, cache_dir, tracking, until, resume, ledger, env, onnx_model)
    finally:
        distributed.shutdown()


def _run_stages(prepared: Prepared, pipeline_file: Path, runs_dir: Path, cache_dir: Path | None, tracking,
                until: str | None, resume: Path | None, ledger: dict[str, Any],
                env: distributed.DistEnv, onnx_model: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    pipeline = prepared.pipeline
    resolved = pipeline.resolved()
    if resume is not None:
        run_dir = Path(resume).resolve()
        runs_dir, run_id = run_dir.parent.parent, run_dir.name
    else:
        runs_dir = Path(runs_dir).resolve()
        run_id = distributed.broadcast_object(new_run_id())  # every rank uses rank 0's run directory
        run_dir = runs_dir / pipeline.name / run_id
        if env.is_main:
            run_dir.mkdir(parents=True)
            (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracker = Tracker(tracking) if env.is_main else SilentTracker()
    progress = Progress() if env.is_main else Progress(open(os.devnull, "w"))
    cache_dir = Path(cache_dir or os.environ.get("KDPIPE_CACHE_DIR") or ledger.get("cache_dir") or runs_dir / ".cache")
    ctx = RunContext(
        pipeline=pipeline, pipeline_file=Path(pipeline_file), run_dir=run_dir, cache_dir=cache_dir,
        data=prepared.data.to(prepared.device), device=prepared.device,
        teacher=prepared.teacher.to(prepared.device) if prepared.teacher is not None else None,
        student=prepared.student.to(prepared.device), tracker=tracker, progress=progress,
        teacher_cache=TeacherOutputCache(cache_dir / "teacher-outputs", pipeline.distill.teacher_cache_memory_mb),
        dist=env,
    )
    if resume is not None:
        if env.is_main:
            ctx.tracker = tracker = ResumedTracker(tracker, ledger["mlflow_run_id"])
        ctx.report = {**ledger["report"], "status": "running", "resumed": ledger["report"].get("resumed", 0) + 1}
        ctx.gates = [Gate(**g) for g in ledger["gates"]]
        ctx.artifacts = {k: Path(v["path"]) if "path" in v else v["value"] for k, v in ledger["artifacts"].items()}
    else:
        _start_report(ctx, tracker, tracking, resolved, run_id)
    if onnx_model is not None:
        ctx.artifacts["given_onnx"] = Path(onnx_model).resolve()
    report_path = run_dir / "report.json"

    def save_ledger() -> None:
        if env.is_main:
            write_json(run_dir / "ledger.json", {
                **ledger, "mlflow_run_id": ctx.report["mlflow"]["run_id"], "cache_dir": str(ctx.cache_dir),
                "report": ctx.report, "gates": [asdict(g) for g in ctx.gates],
                "artifacts": {k: v for k, v in map(_ledger_artifact, ctx.artifacts.items()) if v is not None},
            })

    save_ledger()
    try:
        stages = STAGES[:STAGES.index(until) + 1] if until else STAGES
        if onnx_model is not None:
            stages = VALIDATE_STAGES
        for name in [s for s in stages if s != "search" or pipeline.search is not None]:
            if name in MAIN_RANK_STAGES and not env.is_main:
                continue
            stage = importlib.import_module(f"kdpipe.stages.{name}")
            if name in ledger["finished"]:
                if hasattr(stage, "restore"):
                    stage.restore(ctx)
                continue
            start = time.perf_counter()
            with progress.stage(name):
                try:
                    stage.run(ctx)
                except (InputError, GateFailed):
                    raise
                except Exception as exc:
                    raise StageFailed(name, exc) from exc
            seconds = time.perf_counter() - start
            ctx.report["stage_seconds"][name] = round(seconds, 3)
            tracker.log_metrics({f"stage_seconds/{name}": seconds})
            ledger["finished"].append(name)
            save_ledger()
    except BaseException as exc:
        if env.is_main:
            ctx.report["status"] = "failed"
            ctx.report["error"] = exc.format(None) if isinstance(exc, InputError) else str(exc) or type(exc).__name__
            ctx.report["gates"] = {g.name: g.as_dict() for g in ctx.gates}
            write_json(report_path, ctx.report)
            tracker.log_artifact(report_path)
            tracker.set_tags({"kdpipe.status": "failed"})
            tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if not env.is_main:
        return None, ctx.report
    ctx.report["gates"] = {g.name: g.as_dict() for g in ctx.gates}
    ctx.report["status"] = "passed" if ctx.gates_passed else "failed"
    write_json(report_path, ctx.report)
    tracker.log_artifact(run_dir / "pipeline.yaml")
    tracker.log_artifact(report_path)
    tracker.set_tags({"kdpipe.status": ctx.report["status"]})
    tracker.end("FINISHED" if ctx.gates_passed else "FAILED")
    progress.gate_table(ctx.gates)
    return report_path, ctx.report


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


def _start_report(ctx: RunContext, tracker: Tracker, tracking, resolved: dict[str, Any], run_id: str) -> None:
    pipeline, run_dir = ctx.pipeline, ctx.run_dir
    mlflow_run_id = tracker.start(f"{pipeline.name}-{run_id}", {"kdpipe.version": __version__, "kdpipe.run_dir": str(run_dir),
                                                                "kdpipe.method": pipeline.distill.method})
    tracker.log_params(resolved)
    ctx.report = {
        "status": "running",
        "name": pipeline.name,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "method": {"name": pipeline.distill.method, "params": pipeline.distill.params},
        "data": {"source": pipeline.data.source, **ctx.data.sizes(), "num_classes": ctx.data.num_classes},
        "device": str(ctx.device),
        "stage_seconds": {},
        "mlflow": {"tracking_uri": tracking.tracking_uri, "experiment": tracking.experiment, "run_id": mlflow_run_id,
                   "model_name": None, "model_version": None, "alias": None},
    }
