"""distill: train the student with the selected method."""

from __future__ import annotations

import torch

from kdpipe.methods import get_method
from kdpipe.models import count_params
from kdpipe.inference import accuracy
from kdpipe.results import DistillResult, SearchResult, Stage, TeacherResult
from kdpipe.train import Trainer


class Distill(Stage):
    name = "distill"
    needs = (TeacherResult,)
    uses = (SearchResult,)  # the best trial's student, when the search kept it
    produces = DistillResult

    def run(self, ctx) -> DistillResult:
        return run(ctx)

    def restore(self, ctx, result: DistillResult) -> DistillResult:
        """--resume after this stage finished: the distilled student from the run directory."""
        if not get_method(ctx.pipeline.distill.method).fit_returns_student:
            # The exported module (a DML peer, a BAN ensemble) is built by fit itself: run the stage again.
            return run(ctx)
        state = torch.load(ctx.run_dir / "student.pt", map_location=ctx.device, weights_only=True)
        ctx.student.load_state_dict(state["student"])
        ctx.student.eval()
        return result


def run(ctx) -> DistillResult:
    cfg = ctx.pipeline.distill
    method_cls = get_method(cfg.method)
    method = method_cls(cfg.params, student=ctx.student, teacher=ctx.teacher,
                        num_classes=ctx.data.num_classes, input_shape=ctx.data.input_shape, taps=cfg.taps)
    search = ctx.results.get(SearchResult)
    trained = search.student_checkpoint if search is not None else None  # the best trial, trained with these params
    report = {}
    if trained is not None and method_cls.fit_returns_student:
        state = torch.load(trained, map_location=ctx.device, weights_only=True)
        ctx.student.load_state_dict(state["student"])
        if "extra" in state:
            method.extra_modules().load_state_dict(state["extra"])
        ctx.progress.info(f"  student reused from the search's best trial: {trained}")
        student = ctx.student
    else:
        trainer = Trainer(ctx.data, epochs=cfg.epochs, batch_size=ctx.pipeline.data.batch_size, optimizer=cfg.optimizer,
                          seed=ctx.pipeline.seed, on_epoch=ctx.log_epoch, **ctx.trainer_options("distill"))
        torch.manual_seed(ctx.pipeline.seed + 1)
        student = method.fit(trainer)
        report["distill"] = {"timing": trainer.timing_summary(), "optimizer_steps": trainer.optimizer_steps}
        if trainer.teacher_modes:  # views | cached | online, with the reason, per teacher the method reads
            report["distill"]["teacher_mode"] = "+".join(dict.fromkeys(m["mode"] for m in trainer.teacher_modes))
            report["distill"]["teacher"] = trainer.teacher_modes
        if trainer.static_batches:
            report["distill"]["static_batches"] = trainer.static_batch_summary()
    student.eval()
    ctx.student = student
    checkpoint = {"student": student.state_dict()}
    extra = method.extra_modules()
    if extra is not None:
        checkpoint["extra"] = extra.state_dict()
    if ctx.is_main:
        torch.save(checkpoint, ctx.run_dir / "student.pt")
    acc = accuracy(student, ctx.data.x_test, ctx.data.y_test)
    ctx.tracker.log_metrics({"student/test_accuracy_torch": acc})
    report["student"] = {"params": count_params(student), "accuracy_torch": acc,
                         "val_accuracy": accuracy(student, ctx.data.x_val, ctx.data.y_val)}
    return DistillResult(report=report, accuracy_torch=acc)
