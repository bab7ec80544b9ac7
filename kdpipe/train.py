"""The training loop every method shares.

Data is held as tensors on the device; an epoch is a shuffled permutation of
indices sliced into batches. Teacher outputs are computed once and indexed by
the same batch indices when the data has no random augmentation; otherwise the
teacher runs on each batch.

Under torchrun every rank draws the same permutation and takes its share of
each batch (`data.batch_size` stays the global batch, so one pipeline file
trains the same way on any number of processes); DistributedDataParallel
averages the gradients and the epoch metrics are summed over ranks. With a
checkpoint directory, each `fit` saves its whole state after every epoch and
picks up from there when the run is resumed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import distributed
from kdpipe.atomic import save_torch
from kdpipe.data import Splits
from kdpipe.errors import InputError
from kdpipe.taps import Outputs, forward_with_taps
from kdpipe.teacher_cache import TeacherOutputCache, teacher_pass


@dataclass
class Batch:
    index: torch.Tensor  # positions in the training split, for cached teacher outputs
    x: torch.Tensor
    y: torch.Tensor


StepFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EpochCallback = Callable[[str, int, int, dict[str, float]], None]  # label, epoch, epochs, metrics
TeacherFn = Callable[[Batch], Outputs]

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def make_optimizer(params, cfg, epochs: int, steps_per_epoch: int):
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if cfg.scheduler == "cosine" else None
    return opt, schedule


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, taps: list[str] | None = None) -> Outputs:
    """Eval-mode outputs (logits and tapped features) over `x`, in batches."""
    was_training = model.training
    model.eval()
    chunks = [forward_with_taps(model, x[i:i + batch_size], taps or []) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return Outputs(
        torch.cat([c.logits for c in chunks]),
        {k: torch.cat([c.features[k] for c in chunks]) for k in (taps or [])},
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).logits.argmax(1) == y).float().mean().item()


class _StepModule(nn.Module):
    """The trained modules with the method's step as forward, so DistributedDataParallel sees each step."""

    def __init__(self, modules: list[nn.Module], step: StepFn):
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self.step = step

    def forward(self, batch: Batch):
        return self.step(batch)




class Trainer:
    """Trains models on one `Splits` with one optimizer setting; reports each epoch to `on_epoch`.

    precision: auto | fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler). compile_model: torch.compile
    the trained model. checkpoint_dir: save each fit after every epoch and resume from it. teacher_online:
    run the teacher on every batch instead of caching its outputs (forced when `augment` is given, since
    augmented inputs differ every epoch). augment: a function of the input batch applied at every step.
    """

    def __init__(self, data: Splits, *, epochs: int, batch_size: int, optimizer, seed: int,
                 on_epoch: EpochCallback | None = None, teacher_cache: TeacherOutputCache | None = None,
                 precision: str = "auto", compile_model: bool = False, checkpoint_dir: Path | None = None,
                 teacher_online: bool = False, augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.seed = seed
        self.on_epoch = on_epoch or (lambda label, epoch, epochs, metrics: None)
        self.teacher_cache = teacher_cache or TeacherOutputCache()
        self.device = data.y_train.device
        self.precision = resolve_precision(precision, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.compile_model = compile_model
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.teacher_online = teacher_online or augment is not None
        self.augment = augment
        self.dist = distributed.current()
        self.channels_last = self.device.type == "cuda" and data.x_train.dim() == 4
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels once
        self._fit_calls = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.y_train) / self.batch_size)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """This rank's share of each batch of a fresh permutation (every rank draws the same one)."""
        n = len(self.data.y_train)
        ranks, rank = self.dist.world_size, self.dist.rank
        order = torch.randperm(n, generator=generator).to(self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if len(idx) < 2 * ranks and n >= 2 * ranks:  # BatchNorm cannot train on one sample per rank
                continue
            idx = idx[rank::ranks]
            x = self.data.x_train[idx]
            if self.augment is not None:
                x = self.augment(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(idx, x, self.data.y_train[idx])

    def teacher_outputs(self, teacher: nn.Module, taps: list[str]) -> Outputs:
        """The frozen teacher's eval-mode outputs over the training split, computed once per (teacher, taps)."""
        self._prepare(teacher)
        return self.teacher_cache.get(teacher, self.data.x_train, taps, self.data.fingerprint,
                                      autocast=self.autocast_dtype, channels_last=self.channels_last)

    def teacher_step(self, teacher: nn.Module, taps: list[str], cacheable: bool = True) -> TeacherFn:
        """The teacher's outputs for a batch: looked up in the cache, or computed online when the method opts
        out of caching (`cacheable=False`), the pipeline turns the cache off, or the inputs are augmented."""
        if cacheable and not self.teacher_online:
            cached = self.teacher_outputs(teacher, taps)
            return lambda batch: cached.select(batch.index)
        self._prepare(teacher)
        return lambda batch: teacher_pass(teacher, batch.x, taps, self.autocast_dtype)

    def _prepare(self, module: nn.Module) -> None:
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

    def _checkpoint_path(self, label: str) -> Path | None:
        return self.checkpoint_dir / f"{label}-{self._fit_calls}.pt" if self.checkpoint_dir else None

    def _val_accuracy(self, model: nn.Module) -> float:
        """Validation accuracy, each rank scoring its share of the validation split."""
        ranks, rank = self.dist.world_size, self.dist.rank
        x, y = self.data.x_val[rank::ranks], self.data.y_val[rank::ranks]
        with self.autocast():
            correct = (predict(model, x).logits.argmax(1) == y).sum()
        counts = distributed.all_reduce_sum(torch.stack([correct.double(), torch.tensor(len(y), dtype=torch.float64,
                                                                                         device=correct.device)]))
        return (counts[0] / counts[1]).item()

    def fit(self, model: nn.Module, step: StepFn, *, extra: nn.Module | None = None, label: str = "student",
            params: list[nn.Parameter] | None = None, epochs: int | None = None) -> dict[str, float]:
        """Train `model` (and `extra`) on `step`'s loss; keep the weights of the best validation epoch.

        Returns the final epoch's metrics with the best validation accuracy.
        """
        epochs = self.epochs if epochs is None else epochs
        self._fit_calls += 1
        checkpoint_path = self._checkpoint_path(label)
        modules = [model] + ([extra] if extra is not None else [])
        for module in modules:
            self._prepare(module)
        if self.compile_model:
            model.compile()  # in place: the method's own references to the model run compiled too
        trainable = params if params is not None else [p for m in modules for p in m.parameters()]
        opt, schedule = make_optimizer(trainable, self.optimizer, epochs, self.steps_per_epoch)
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        generator = torch.Generator().manual_seed(self.seed)
        state: dict[str, Any] = {"epoch": 0, "best_acc": -1.0, "best_state": None, "metrics": {}}
        if checkpoint_path is not None and checkpoint_path.is_file():
            state = self._restore(checkpoint_path, model, extra, opt, schedule, scaler, generator)
        run_step: StepFn = step
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: `params=` may train a part of the model, leaving the rest out of the loss.
            run_step = DistributedDataParallel(_StepModule(modules, step), find_unused_parameters=True,
                                               device_ids=[self.device] if self.device.type == "cuda" else None)
        for epoch in range(state["epoch"] + 1, epochs + 1):
            for module in modules:
                module.train()
            names: list[str] = []
            sums: torch.Tensor | float = 0.0  # per metric, summed over samples: one tensor op per step
            count = 0
            for batch in self.batches(generator):
                with self.autocast():
                    loss, parts = run_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{label} loss became {loss.item()} at epoch {epoch}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if schedule is not None:
                    schedule.step()
                names = ["loss", *parts]
                sums = sums + torch.stack([torch.as_tensor(v, device=self.device).float()
                                           for v in (loss.detach(), *parts.values())]) * len(batch.y)
                count += len(batch.y)
            distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere: one model to validate
            totals = distributed.all_reduce_sum(torch.cat([torch.as_tensor(sums, device=self.device).reshape(-1),
                                                           torch.tensor([float(count)], device=self.device)]).double())
            metrics = {f"train_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(names)}
            metrics["val_accuracy"] = val_acc = self._val_accuracy(model)
            self.on_epoch(label, epoch, epochs, metrics)
            if val_acc > state["best_acc"]:
                state["best_acc"], state["best_state"] = val_acc, copy.deepcopy(model.state_dict())
            state["epoch"], state["metrics"] = epoch, metrics
            if checkpoint_path is not None and self.dist.is_main:
                self._save(checkpoint_path, state, epochs, model, extra, opt, schedule, scaler, generator)
        if state["best_state"] is not None:
            model.load_state_dict(state["best_state"])
        return {**state["metrics"], "best_val_accuracy": state["best_acc"]}

    def _save(self, path: Path, state: dict[str, Any], epochs: int, model, extra, opt, schedule, scaler, generator) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch({
            **state, "epochs": epochs,
            "model": model.state_dict(), "extra": extra.state_dict() if extra is not None else None,
            "optimizer": opt.state_dict(), "schedule": schedule.state_dict() if schedule is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }, path)

    def _restore(self, path: Path, model, extra, opt, schedule, scaler, generator) -> dict[str, Any]:
        saved = torch.load(path, map_location=self.device, weights_only=True)
        model.load_state_dict(saved["model"])
        if extra is not None and saved["extra"] is not None:
            extra.load_state_dict(saved["extra"])
        opt.load_state_dict(saved["optimizer"])
        if schedule is not None and saved["schedule"] is not None:
            schedule.load_state_dict(saved["schedule"])
        if scaler is not None and saved["scaler"] is not None:
            scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["generator"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        if saved["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["cuda_rng"]])
        return {k: saved[k] for k in ("epoch", "best_acc", "best_state", "metrics")}
