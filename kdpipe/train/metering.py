"""Epoch metering: the loss parts summed over an epoch's samples (and over ranks), the finiteness flag, and the
epoch timings report.json summarizes."""

from __future__ import annotations

import time
from typing import Any

import torch

from kdpipe import distributed


class EpochMeter:
    """Sums each update's loss parts, weighted by batch size, on the device: a step never waits for the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: dict[str, list[str]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.samples = self.steps = 0
        self.start = time.perf_counter()

    def add(self, name: str, loss: torch.Tensor, parts: dict[str, torch.Tensor], size: int) -> None:
        self.finite &= torch.isfinite(loss.detach())
        self.names[name] = ["loss", *parts]
        values = torch.stack([torch.as_tensor(v, device=self.device).float().reshape(())
                              for v in (loss.detach(), *parts.values())]) * size
        self.sums[name] = self.sums[name] + values if name in self.sums else values

    def totals(self) -> tuple[dict[str, dict[str, float]], float, int, bool, float]:
        """Over every rank: (per update, train_<part> means), samples, optimizer steps, whether a loss was
        non-finite, and the epoch's seconds (taken after the first read, which waits for the queued steps)."""
        labels = list(self.names)
        flat = [self.sums[k].double() for k in labels] + [
            torch.tensor([float(self.samples), float(self.steps)], dtype=torch.float64, device=self.device),
            (~self.finite).double().reshape(1)]
        totals = distributed.all_reduce_sum(torch.cat([t.reshape(-1) for t in flat]))
        samples, steps, nonfinite = totals[-3].item(), int(totals[-2].item()), bool(totals[-1].item())
        seconds = time.perf_counter() - self.start
        metrics, offset = {}, 0
        for label in labels:
            metrics[label] = {f"train_{k}": (totals[offset + i] / samples).item() for i, k in enumerate(self.names[label])}
            offset += len(self.names[label])
        return metrics, samples, steps, nonfinite, seconds


class TimingLog:
    """Per epoch: phase, seconds, samples/s; and the optimizer steps taken, over every phase a trainer ran."""

    def __init__(self):
        self.epochs: list[dict[str, Any]] = []
        self.optimizer_steps = 0

    def summary(self) -> dict[str, float] | None:
        """Median epoch seconds (training alone) and validation seconds, training throughput over every epoch, and
        what the first epoch took beyond the median."""
        if not self.epochs:
            return None
        seconds = sorted(e["epoch_seconds"] for e in self.epochs)
        summary = {"epochs": len(seconds), "median_epoch_seconds": _median(seconds),
                   "samples_per_second": sum(e["samples"] for e in self.epochs) / sum(seconds),
                   "optimizer_steps": self.optimizer_steps}
        val = [e["val_samples_per_second"] for e in self.epochs if "val_samples_per_second" in e]
        if val:
            summary["val_samples_per_second"] = sorted(val)[len(val) // 2]
            summary["median_val_seconds"] = _median(sorted(e["val_seconds"] for e in self.epochs
                                                           if "val_seconds" in e))
        # The first epoch's extra over the median: compilation (distill.compile) and first-call warm-up.
        first_extra = self.epochs[0]["epoch_seconds"] - summary["median_epoch_seconds"]
        summary["first_epoch_extra_seconds"] = max(0.0, first_extra)
        return summary


def _median(ordered: list[float]) -> float:
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
