"""The training loop every method shares.

Data is held as tensors on the device; an epoch is a shuffled permutation of
indices sliced into batches. Teacher outputs are computed once and indexed by
the same batch indices, since the data has no random augmentation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kdpipe.data import Splits
from kdpipe.taps import Outputs, forward_with_taps
from kdpipe.teacher_cache import TeacherOutputCache


@dataclass
class Batch:
    index: torch.Tensor  # positions in the training split, for cached teacher outputs
    x: torch.Tensor
    y: torch.Tensor


StepFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EpochCallback = Callable[[str, int, int, dict[str, float]], None]  # label, epoch, epochs, metrics


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


class Trainer:
    """Trains models on one `Splits` with one optimizer setting; reports each epoch to `on_epoch`."""

    def __init__(self, data: Splits, *, epochs: int, batch_size: int, optimizer, seed: int,
                 on_epoch: EpochCallback | None = None, teacher_cache: TeacherOutputCache | None = None):
        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.seed = seed
        self.on_epoch = on_epoch or (lambda label, epoch, epochs, metrics: None)
        self.teacher_cache = teacher_cache or TeacherOutputCache()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.y_train) / self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        n = len(self.data.y_train)
        order = torch.randperm(n, generator=generator).to(self.data.y_train.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on one sample
                continue
            yield Batch(idx, self.data.x_train[idx], self.data.y_train[idx])

    def teacher_outputs(self, teacher: nn.Module, taps: list[str]) -> Outputs:
        """The frozen teacher's eval-mode outputs over the training split, computed once per (teacher, taps)."""
        return self.teacher_cache.get(teacher, self.data.x_train, taps, self.data.fingerprint)

    def fit(self, model: nn.Module, step: StepFn, *, extra: nn.Module | None = None, label: str = "student",
            params: list[nn.Parameter] | None = None, epochs: int | None = None) -> dict[str, float]:
        """Train `model` (and `extra`) on `step`'s loss; keep the weights of the best validation epoch.

        Returns the final epoch's metrics with the best validation accuracy.
        """
        epochs = self.epochs if epochs is None else epochs
        trainable = params if params is not None else list(model.parameters()) + (list(extra.parameters()) if extra else [])
        opt, schedule = make_optimizer(trainable, self.optimizer, epochs, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed)
        best_acc, best_state = -1.0, None
        metrics: dict[str, float] = {}
        for epoch in range(1, epochs + 1):
            model.train()
            if extra is not None:
                extra.train()
            sums: dict[str, torch.Tensor] = {}
            count = 0
            for batch in self.batches(generator):
                loss, parts = step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{label} loss became {loss.item()} at epoch {epoch}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                for name, value in {"loss": loss.detach(), **parts}.items():
                    sums[name] = sums.get(name, 0.0) + value * len(batch.y)
                count += len(batch.y)
            val_acc = accuracy(model, self.data.x_val, self.data.y_val)
            metrics = {f"train_{k}": (v / count).item() for k, v in sums.items()}
            metrics["val_accuracy"] = val_acc
            self.on_epoch(label, epoch, epochs, metrics)
            if val_acc > best_acc:
                best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        if best_state is not None:
            model.load_state_dict(best_state)
        metrics["best_val_accuracy"] = best_acc
        return metrics
