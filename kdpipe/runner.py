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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdpipe import __version__
from kdpipe.config import Pipeline, load_pipeline
from kdpipe.data import Splits, load_data
from kdpipe.errors import GateFailed, InputError, StageFailed
from kdpipe.models import build_model, load_checkpoint
from kdpipe.progress import Progress
from kdpipe.tracking import Tracker, load_tracking_config

STAGES = ["teacher", "distill", "export", "validate", "register"]


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


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a reader never sees a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("distill.device", f"'{name}' was asked for but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class Prepared:
    pipeline: Pipeline
    data: Splits
    teacher: nn.Module | None
    student: nn.Module
    device: torch.device


def prepare(pipeline_file: Path, overrides: list[str]) -> Prepared:
    """Validate the pipeline file and every input it names; raises InputError (exit 2)."""
    pipeline = load_pipeline(pipeline_file, overrides)
    torch.manual_seed(pipeline.seed)
    device = pick_device(pipeline.distill.device)
    data = load_data(pipeline.data, pipeline.seed)
    teacher = None
    if pipeline.teacher is not None:
        teacher = build_model(pipeline.teacher.model, "teacher.model", data.input_shape, data.num_classes)
        if pipeline.teacher.checkpoint is not None:
            load_checkpoint(teacher, pipeline.teacher.checkpoint, "teacher.checkpoint")
    torch.manual_seed(pipeline.seed + 1)
    student = build_model(pipeline.student.model, "student.model", data.input_shape, data.num_classes)
    return Prepared(pipeline, data, teacher, student, device)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def run_pipeline(pipeline_file: Path, overrides: list[str], runs_dir: Path, cache_dir: Path | None = None,
                 mlflow_config: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run every stage; return (report path, report). Raises InputError, GateFailed or StageFailed."""
    prepared = prepare(pipeline_file, overrides)
    tracking = load_tracking_config(mlflow_config)
    from kdpipe.onnx_runtime import import_ort

    try:
        import_ort()
    except RuntimeError as exc:
        raise InputError("", str(exc)) from None

    pipeline = prepared.pipeline
    run_id = new_run_id()
    run_dir = runs_dir / pipeline.name / run_id
    run_dir.mkdir(parents=True)
    resolved = pipeline.resolved()
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracker = Tracker(tracking)
    progress = Progress()
    ctx = RunContext(
        pipeline=pipeline, pipeline_file=Path(pipeline_file), run_dir=run_dir,
        cache_dir=Path(cache_dir or os.environ.get("KDPIPE_CACHE_DIR") or runs_dir / ".cache"),
        data=prepared.data.to(prepared.device), device=prepared.device,
        teacher=prepared.teacher.to(prepared.device) if prepared.teacher is not None else None,
        student=prepared.student.to(prepared.device), tracker=tracker, progress=progress,
    )
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
    ledger: dict[str, Any] = {"finished": []}
    report_path = run_dir / "report.json"
    try:
        for name in STAGES:
            stage = importlib.import_module(f"kdpipe.stages.{name}")
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
            write_json(run_dir / "ledger.json", ledger)
    except BaseException as exc:
        ctx.report["status"] = "failed"
        ctx.report["error"] = exc.format(None) if isinstance(exc, InputError) else str(exc) or type(exc).__name__
        ctx.report["gates"] = {g.name: g.as_dict() for g in ctx.gates}
        write_json(report_path, ctx.report)
        tracker.log_artifact(report_path)
        tracker.set_tags({"kdpipe.status": "failed"})
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    ctx.report["gates"] = {g.name: g.as_dict() for g in ctx.gates}
    ctx.report["status"] = "passed" if ctx.gates_passed else "failed"
    write_json(report_path, ctx.report)
    tracker.log_artifact(run_dir / "pipeline.yaml")
    tracker.log_artifact(report_path)
    tracker.set_tags({"kdpipe.status": ctx.report["status"]})
    tracker.end("FINISHED" if ctx.gates_passed else "FAILED")
    progress.gate_table(ctx.gates)
    return report_path, ctx.report
