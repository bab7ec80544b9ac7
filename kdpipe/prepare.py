"""Everything that can reject the user's input (the pipeline file, data files, models, checkpoints), checked before a
run directory or an MLflow run exists, so invalid input leaves nothing behind (InputError, exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdpipe import distributed
from kdpipe.data import Splits, load_data
from kdpipe.data.storage import available_bytes
from kdpipe.errors import InputError
from kdpipe.methods import get_method
from kdpipe.models import build_model, load_checkpoint
from kdpipe.models.adapter import check_uint8_input
from kdpipe.pipeline import Pipeline, load_pipeline
from kdpipe.teacher_views import views_nbytes
from kdpipe.train import resolve_precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("distill.device", f"'{name}' was asked for but torch sees no CUDA device")
    if name == "cuda" and distributed.from_environment().enabled:
        name = f"cuda:{distributed.from_environment().local_rank}"  # torchrun: one GPU per process
    return torch.device(name)


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
    torch.manual_seed(pipeline.training_seed + 1)
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
    if data.augmentation is None and data.strong_augmentation is None:
        return
    _, height, width = data.input_shape
    for key in ("augment", "strong_augment"):
        for i, step in enumerate(getattr(pipeline.data, key)):
            # Beyond the image's side a crop can miss the image altogether (and reflect padding cannot reach).
            if step.name == "random_crop" and step.params.padding >= min(height, width):
                raise InputError(f"data.{key}.{i}.random_crop.padding",
                                 f"expected at most {min(height, width) - 1} for {height}×{width} images (less than "
                                 f"their smaller side, so that every crop keeps part of the image), "
                                 f"got {step.params.padding}")
    cfg = pipeline.distill
    method = get_method(cfg.method)
    if (pipeline.teacher is None or cfg.teacher_cache == "off" or data.augmentation is None or method.two_views
            or not (method.reads_teacher_soft_labels(cfg.params) and method.cache_teacher)):
        return  # no teacher views are recorded: the teacher runs online (Trainer.teacher)
    per_view = views_nbytes(data, 1, cfg.teacher_topk)
    free = available_bytes(device)
    if per_view * cfg.views_per_image > free:
        raise InputError("distill.teacher_views",
                         f"expected at most {free // per_view} views of the {len(data.y_train)} training images on "
                         f"this machine, got {cfg.views_per_image}: they need about "
                         f"{per_view * cfg.views_per_image / 1e9:.0f} GB (augmentation parameters and the teacher's "
                         f"top-{min(cfg.teacher_topk, data.num_classes)} soft labels), all held in memory while the "
                         f"teacher pass makes them, and {device} has {free / 1e9:.1f} GB free")
