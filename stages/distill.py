"""distill: train the student with the selected method."""

from __future__ import annotations

import time

import torch

from kdpipe.errors import InputError
from kdpipe.methods import get_method
from kdpipe.models import count_params
from kdpipe.inference import accuracy
from kdpipe.results import DistillResult, SearchResult, Stage, TeacherResult
from kdpipe.train import Trainer, load_method, save_method


class Distill(Stage):
    name = "distill"
    needs = (TeacherResult,)
    uses = (SearchResult,)  # the best trial's trained method, when the search kept it
    produces = DistillResult

    def run(self, ctx) -> DistillResult:
        return run(ctx)

    def restore(self, ctx, result: DistillResult) -> DistillResult:
        """--resume after this stage finished: the trained method, and its exported student, from the run directory.
        A student.pt of the previous release without the method's other networks (DML peers, BAN generations): the
        stage runs again, its phases restored from their finished checkpoints."""
        method = build(ctx)
        try:
            load_method(method, ctx.run_dir / "student.pt", ctx.device)
        except InputError as exc:
            ctx.progress.info(f"  {exc.message}: distill runs again from its phase checkpoints")
            return run(ctx)
        ctx.student = method.exported().eval()
        return result


def build(ctx):
    """The method, its own modules (CRD's heads, ReviewKD's fusions, VID's variances) drawn from the training seed:
    the same whether the teacher was trained in this process or read from the cache."""
    cfg = ctx.pipeline.distill
    torch.manual_seed(ctx.pipeline.training_seed + 1)
    return get_method(cfg.method)(cfg.params, student=ctx.student, teacher=ctx.teacher, num_classes=ctx.data.num_classes,
                                  input_shape=ctx.data.input_shape, taps=cfg.taps, seed=ctx.pipeline.training_seed)


def stage_timing(trainer: Trainer, seconds: float) -> dict | None:
    """The trainer's epoch timings beside the whole stage's: its seconds, per epoch run (one-time costs spread over
    the epochs), and the one-time teacher passes (teacher outputs or views, 0 when found in the cache)."""
    timing = trainer.timing_summary()
    if timing is None:
        return None
    passes = [m["teacher_pass"]["seconds"] for m in trainer.teacher_modes if m.get("teacher_pass")]
    return {**timing, "stage_seconds": seconds, "stage_seconds_per_epoch": seconds / timing["epochs"],
            "teacher_pass_seconds": sum(passes)}


def run(ctx) -> DistillResult:
    cfg = ctx.pipeline.distill
    method = build(ctx)
    search = ctx.results.get(SearchResult)
    trained = search.student_checkpoint if search is not None else None  # the best trial, trained with these params
    report = {}
    if trained is not None:
        load_method(method, trained, ctx.device)
        ctx.progress.info(f"  student reused from the search's best trial: {trained}")
    else:
        history: dict = {}
        trainer = Trainer(ctx.data, epochs=cfg.epochs, batch_size=ctx.pipeline.data.batch_size, optimizer=cfg.optimizer,
                          seed=ctx.pipeline.training_seed, on_epoch=ctx.log_epoch_into(history),
                          settings=ctx.trainer_options("distill"))
        start = time.perf_counter()
        method.fit(trainer)
        report["distill"] = {"timing": stage_timing(trainer, time.perf_counter() - start),
                             "optimizer_steps": trainer.optimizer_steps, "history": history}
        # The exported weights are the best epoch's on validation; the last epoch's score is reported beside it.
        epochs = {"val_accuracy_best_epoch": trainer.final_metrics.get("best_val_accuracy"),
                  "val_accuracy_last_epoch": trainer.final_metrics.get("val_accuracy")}
        if trainer.teacher_modes:  # views | cached | online, with the reason, per teacher the method reads
            report["distill"]["teacher_mode"] = "+".join(dict.fromkeys(m["mode"] for m in trainer.teacher_modes))
            report["distill"]["teacher"] = trainer.teacher_modes
        if trainer.static_batches:
            report["distill"]["static_batches"] = trainer.static_batch_summary()
    ctx.student = student = method.exported().eval()
    if ctx.is_main:
        save_method(method, ctx.run_dir / "student.pt")
    acc = accuracy(student, ctx.data.x_test, ctx.data.y_test)
    ctx.tracker.log_metrics({"student/test_accuracy_torch": acc})
    report["student"] = {"params": count_params(student), "accuracy_torch": acc,
                         "val_accuracy": accuracy(student, ctx.data.x_val, ctx.data.y_val)}
    if trained is None:
        report["student"].update(epochs)
    return DistillResult(report=report, accuracy_torch=acc)
