"""An update's optimizer, its LR schedule (warm-up, cosine, multistep) and its step: gradient accumulation, the
fp16 scaler, averaging over ranks, clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.train.steps import Update


def param_groups(params: list[nn.Parameter], filter_bias_and_bn: bool) -> list[nn.Parameter] | list[dict]:
    """With `filter_bias_and_bn`, biases and normalization weights (every tensor of one dimension or none, as timm
    tells them) are not decayed: decay pulls a BatchNorm scale towards 0, which no regularization intends."""
    if not filter_bias_and_bn:
        return params
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def lr_factor(step: int, total: int, warmup: int, start_factor: float, cosine: bool) -> float:
    """The LR multiplier at `step`: linear from start_factor to 1 over `warmup` steps, then cosine to 0 over the
    rest (or constant)."""
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    if not cosine:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))


def multistep_factor(step: int, milestone_steps: list[int], gamma: float, warmup: int, start_factor: float) -> float:
    """The LR multiplier at `step` of a multistep schedule: gamma once for every milestone reached (counted from the
    first epoch, warm-up included, as the published recipe counts them), times the linear warm-up's factor."""
    decay = gamma ** sum(step >= m for m in milestone_steps)
    return decay * lr_factor(step, 0, warmup, start_factor, cosine=False)


def make_optimizer(params, cfg, epochs: int, steps_per_epoch: int, *, warmup_steps: int = 0,
                   warmup_start_factor: float = 0.01, filter_bias_and_bn: bool = False):
    params = [p for p in params if p.requires_grad]
    groups = param_groups(params, filter_bias_and_bn)
    # One fused kernel per step instead of one per parameter tensor, where torch has it (CUDA parameters).
    fused = {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    total = max(1, epochs * steps_per_epoch)
    warmup = min(warmup_steps, total)
    if cfg.scheduler == "multistep":
        # Milestones are epochs; the schedule steps once per optimizer step. A LambdaLR's state is its step count,
        # which the phase checkpoint holds, so a resumed run continues the same schedule.
        milestone_steps = [m * steps_per_epoch for m in cfg.milestones]
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: multistep_factor(step, milestone_steps, cfg.decay_factor, warmup, warmup_start_factor))
    cosine = cfg.scheduler == "cosine"
    if warmup > 0:
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total, warmup, warmup_start_factor, cosine))
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if cosine else None


@dataclass
class UpdateState:
    """An update with its optimizer, schedule and fp16 scaler, and how its gradients are stepped."""

    update: Update
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: Any
    params: list[nn.Parameter]

    def backward(self, loss: torch.Tensor, weight: float, first: bool) -> None:
        """Add `weight`·∇loss to the gradients (`first`: of a fresh accumulation)."""
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        if weight != 1:
            loss = loss * weight
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, average: Callable[[list[nn.Parameter]], None], divide: float, clip: float | None) -> None:
        """One optimizer step on the accumulated gradients divided by `divide`, averaged over ranks, clipped to
        global norm `clip`; then the schedule's step."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if divide != 1 and grads:
            torch._foreach_div_(grads, divide)
        average(self.params)
        if clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
