"""How the loop trains, built once from the pipeline and handed down unchanged (a stage that needs other
settings, QAT or a search trial, makes a changed copy with `dataclasses.replace`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdpipe.errors import InputError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainerSettings:
    """precision: auto | fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler). compile: torch.compile the
    trained modules. checkpoint_dir: save each phase after every epoch and resume from it. teacher_cache: the
    teacher-output cache shared by the run's stages (None: one of the trainer's own). teacher_online: run the
    teacher on every batch (`distill.teacher_cache: off`). teacher_views, teacher_topk: with augmented data, the
    recorded views per image and the classes kept per view (kdpipe.teacher_views).

    The rest are off by default: warmup_epochs of linear LR warm-up from warmup_start_factor·lr; clip_grad_norm,
    the largest global gradient norm of an update; grad_accum_steps batches per optimizer step;
    filter_bias_and_bn, no weight decay on biases and normalization weights; ema_decay, an exponential moving
    average of each evaluated model, whose weights are scored and kept instead of the raw ones when ema_export.
    """

    precision: str = "auto"
    compile: bool = False
    checkpoint_dir: Path | None = None
    teacher_cache: Any = field(default=None, compare=False)  # a TeacherOutputCache
    teacher_online: bool = False
    teacher_views: int = 8
    teacher_topk: int = 10
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.01
    clip_grad_norm: float | None = None
    grad_accum_steps: int = 1
    filter_bias_and_bn: bool = False
    ema_decay: float | None = None
    ema_export: bool = False

    @classmethod
    def of(cls, distill, *, teacher_cache=None, checkpoint_dir: Path | None = None,
           student: bool = True) -> TrainerSettings:
        """From the pipeline's `distill` section; `student=False` (training the teacher) leaves the student's
        recipe keys (warm-up, clipping, accumulation, decay filter, EMA) at their defaults, as the teacher cache key
        does not hold them."""
        recipe = {}
        if student:
            recipe = {"warmup_epochs": distill.warmup_epochs, "warmup_start_factor": distill.warmup_start_factor,
                      "clip_grad_norm": distill.clip_grad_norm, "grad_accum_steps": distill.grad_accum_steps,
                      "filter_bias_and_bn": distill.filter_bias_and_bn,
                      "ema_decay": distill.ema.decay if distill.ema else None,
                      "ema_export": bool(distill.ema and distill.ema.export)}
        return cls(precision=distill.precision, compile=distill.compile, checkpoint_dir=checkpoint_dir,
                   teacher_cache=teacher_cache, teacher_online=distill.teacher_cache == "off",
                   teacher_views=distill.views_per_image, teacher_topk=distill.teacher_topk, **recipe)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a CUDA device that supports it (else fp16) and fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise InputError("distill.precision", "fp16 needs a CUDA device (its gradient scaler is CUDA-only); "
                         "use fp32 or bf16 on CPU")
    return precision
