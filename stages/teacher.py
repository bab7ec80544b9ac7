"""teacher: load the checkpoint, or train the teacher once and reuse it from a cache keyed by content hash; then
the teacher_above_chance gate, which ends the run here when it fails."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from kdpipe import __version__, distributed
from kdpipe.cache_store import load_json, lookup, store, store_json
from kdpipe.chance import ChanceLevel
from kdpipe.errors import GateFailed
from kdpipe.fingerprint import fingerprint, module_content, path_content
from kdpipe.methods import get_method
from kdpipe.models import count_params
from kdpipe.inference import accuracy
from kdpipe.results import Stage, TeacherResult
from kdpipe.train import Trainer


def cache_key(ctx) -> str:
    cfg = ctx.pipeline.teacher
    content = {
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "batch_size": ctx.pipeline.data.batch_size,
        "data": ctx.data.fingerprint,
        "seed": ctx.pipeline.seed,
        "kdpipe": __version__,
        "origin": origin(cfg.model),
    }
    return fingerprint(content)


def origin(model) -> dict:
    """What the teacher starts from, by content: the weights file's bytes, an hf: folder's files, an entry point's
    code and package version. A file replaced at the same path is another teacher, never the cached one."""
    found = {"weights": path_content(model.weights) if model.weights is not None else None}
    if (model.arch or "").startswith("hf:"):
        found["hf"] = path_content(model.arch[3:])
    if model.entrypoint is not None:
        found["entrypoint"] = entrypoint_content(model.entrypoint.rpartition(":")[0])
    return found


def entrypoint_content(module: str) -> dict:
    """'file.py', 'FOLDER:package.module' (the pipeline's folder, where a module is looked up first) or an installed
    module, by the source that defines it."""
    if module.endswith(".py"):
        return path_content(module)
    folder, _, dotted = module.rpartition(":")
    if folder:
        local = Path(folder, *dotted.split("."))
        for candidate in (local.with_suffix(".py"), local):
            if candidate.exists():
                return path_content(candidate)
    return module_content(dotted)


class Teacher(Stage):
    name = "teacher"
    produces = TeacherResult
    for_given_model = True  # `kdpipe validate` compares the given model with the pipeline's teacher

    def run(self, ctx) -> TeacherResult:
        cfg = ctx.pipeline.teacher
        if cfg is None:
            return TeacherResult(report={"teacher": None})
        teacher = ctx.teacher
        report, history = {}, None
        if cfg.checkpoint is not None:
            source = f"checkpoint {cfg.checkpoint}"
        else:
            key = cache_key(ctx)
            cached = ctx.cache_dir / "teachers" / f"{key}.pt"
            # The learning curves of the training that made the entry, under its key: the same for every run using it.
            curves = ctx.cache_dir / "teacher-history" / f"{key}.json"
            warn = lambda line: ctx.progress.info(f"  {line}")  # noqa: E731
            # Rank 0 verifies the entry (a corrupt one is removed and retrained); every rank takes its decision.
            if distributed.broadcast_object(ctx.is_main and lookup(cached, warn)):
                teacher.load_state_dict(torch.load(cached, map_location=ctx.device, weights_only=True))
                source = f"cache {cached}"
                ctx.progress.info(f"  teacher loaded from cache {cached}")
                history = load_json(curves, warn) if ctx.is_main else None
            else:
                history = {}
                report["teacher_training"] = train(ctx, teacher, history)
                if ctx.is_main:
                    state = teacher.state_dict()
                    store(cached, lambda tmp: torch.save(state, tmp))
                    store_json(curves, history)
                source = "trained"
        freeze(teacher)
        if ctx.is_main:
            torch.save(teacher.state_dict(), ctx.run_dir / "teacher.pt")
        acc = accuracy(teacher, ctx.data.x_test, ctx.data.y_test)
        ctx.tracker.log_metrics({"teacher/test_accuracy": acc})
        report["teacher"] = {"source": source, "params": count_params(teacher), "accuracy": acc,
                             "val_accuracy": accuracy(teacher, ctx.data.x_val, ctx.data.y_val)}
        if history:  # a checkpoint has none, nor a cache entry made before its curves were kept
            report["teacher"]["history"] = history
        return above_chance(ctx, TeacherResult(report=report, accuracy=acc))

    def restore(self, ctx, result: TeacherResult) -> TeacherResult:
        """--resume after this stage finished: the teacher from the run directory, frozen."""
        if ctx.teacher is not None:
            ctx.teacher.load_state_dict(torch.load(ctx.run_dir / "teacher.pt", map_location=ctx.device,
                                                   weights_only=True))
            freeze(ctx.teacher)
        return result


def freeze(teacher) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def above_chance(ctx, result: TeacherResult) -> TeacherResult:
    """The teacher_above_chance gate; failing, it ends the run here (GateFailed): a student distilled from a teacher
    at chance is at chance too, so distilling it would only waste the time."""
    significance = ctx.pipeline.validation.gates.above_chance
    if significance is None:
        return result
    chance = ChanceLevel.of(ctx.data.y_test)
    gate = chance.gate("teacher_above_chance", result.accuracy, significance)
    result = replace(result, gates=(gate,), report={**result.report,
                                                    "teacher": {**result.report["teacher"], "chance_rate": chance.rate}})
    if not gate.passed:
        raise GateFailed(f"teacher_above_chance: {chance.verdict('teacher', result.accuracy, significance)}", result)
    return result


def train(ctx, teacher, history: dict) -> dict:
    """Train the teacher from scratch, its learning curves kept in `history`; returns report.json's
    teacher_training."""
    cfg = ctx.pipeline.teacher.train
    scratch = get_method("none")
    trainer = Trainer(ctx.data, epochs=cfg.epochs, batch_size=ctx.pipeline.data.batch_size, optimizer=cfg.optimizer,
                      seed=ctx.pipeline.seed, on_epoch=ctx.log_epoch_into(history),
                      settings=ctx.trainer_options("teacher"))
    torch.manual_seed(ctx.pipeline.seed)
    scratch(scratch.Params(), student=teacher, teacher=None, num_classes=ctx.data.num_classes,
            input_shape=ctx.data.input_shape).fit(trainer, label="teacher")
    return {"timing": trainer.timing_summary()}

