"""What the loop runs: batches, updates (one optimizer step per batch each) and phases (epochs of updates)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdpipe.taps import Outputs


@dataclass
class Batch:
    index: torch.Tensor  # positions in the training split, for cached teacher outputs
    x: torch.Tensor
    y: torch.Tensor
    view: torch.Tensor | None = None  # with teacher views: which recorded view of each image `x` is
    x_strong: torch.Tensor | None = None  # in a two-view phase: the strongly augmented view of the same images


# An update's loss: (batch, state shared by the updates of one step) -> (loss, named parts to report).
LossFn = Callable[[Batch, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EpochCallback = Callable[[str, int, int, dict[str, float]], None]  # label, epoch, epochs, metrics
TeacherFn = Callable[[Batch], Outputs]


@dataclass
class Update:
    """One optimizer step per batch: `loss` trains `modules` (or only `params` of them) with `optimizer`."""

    name: str  # metric label of its loss parts
    modules: list[nn.Module]
    loss: LossFn
    params: list[nn.Parameter] | None = None
    optimizer: Any = None  # an OptimizerConfig; None: the trainer's


@dataclass
class Phase:
    """`epochs` epochs of `updates`; `evaluate` names the models scored on validation each epoch, whose best
    epoch's weights are kept (none: the last epoch's weights stand)."""

    name: str
    updates: list[Update]
    epochs: int
    evaluate: dict[str, nn.Module] = field(default_factory=dict)
    # Called with each epoch's number (from 1) before it runs, resumed epochs included: a schedule of model state
    # that is a function of the epoch (QAT's BatchNorm freeze) holds across a kill.
    before_epoch: Callable[[int], None] | None = None
    # Its batches carry a second, strongly augmented view of each image (Batch.x_strong; data.strong_augment).
    two_views: bool = False

    def modules(self) -> list[nn.Module]:
        """Every module the phase trains or scores, once each, in a fixed order (the checkpoint's)."""
        return unique([m for u in self.updates for m in u.modules] + list(self.evaluate.values()))


def full_precision(device: torch.device):
    """Autocast off: distances, Gram matrices and MMD lose too much in bf16/fp16 (METHODS.md)."""
    return torch.autocast(device.type, enabled=False)


def unique(items: Iterable) -> list:
    """`items` without repeats (by identity), in order."""
    seen: dict[int, Any] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch: its fields, through dataclasses, dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def prefetched(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """On CUDA: each batch is prepared (gathered, converted, augmented, or copied from pinned memory) on a side
    stream while the step before it runs on the current stream. Elsewhere the batches as they come: a
    preparing thread would only compete with the step for the same cores."""
    if device.type != "cuda":
        return batches
    return _side_stream_batches(batches, device)


def _side_stream_batches(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    side, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(current)  # inputs made on the current stream before the epoch (data, teacher outputs) are ready

    def prepare() -> Batch | None:
        with torch.cuda.stream(side):
            return next(batches, None)

    upcoming = prepare()
    while upcoming is not None:
        current.wait_stream(side)  # the step waits for its batch only, not for the one queued after it
        for tensor in _tensors(upcoming):
            if tensor.is_cuda:
                tensor.record_stream(current)  # allocated on the side stream: not reused before the step is done
        batch, upcoming = upcoming, prepare()
        yield batch
