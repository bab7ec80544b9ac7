"""distill: train the student with the selected method."""

from __future__ import annotations

import torch

from kdpipe.methods import get_method
from kdpipe.models import count_params
from kdpipe.train import Trainer, accuracy


def run(ctx) -> None:
    cfg = ctx.pipeline.distill
    method_cls = get_method(cfg.method)
    method = method_cls(method_cls.Params(**cfg.params), student=ctx.student, teacher=ctx.teacher,
                        num_classes=ctx.data.num_classes, input_shape=ctx.data.input_shape, taps=cfg.taps)
    trainer = Trainer(ctx.data, epochs=cfg.epochs, batch_size=ctx.pipeline.data.batch_size, optimizer=cfg.optimizer,
                      seed=ctx.pipeline.seed, on_epoch=ctx.log_epoch)
    torch.manual_seed(ctx.pipeline.seed + 1)
    student = method.fit(trainer)
    student.eval()
    ctx.student = student
    checkpoint = {"student": student.state_dict()}
    extra = method.extra_modules()
    if extra is not None:
        checkpoint["extra"] = extra.state_dict()
    torch.save(checkpoint, ctx.run_dir / "student.pt")
    acc = accuracy(student, ctx.data.x_test, ctx.data.y_test)
    ctx.tracker.log_metrics({"student/test_accuracy_torch": acc})
    ctx.report["student"] = {"params": count_params(student), "accuracy_torch": acc,
                             "val_accuracy": accuracy(student, ctx.data.x_val, ctx.data.y_val)}
