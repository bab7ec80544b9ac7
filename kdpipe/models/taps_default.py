"""Default feature taps for models that do not declare them: the ends of the network's stages (shallow → deep)
and the embedding (the vector the classifier reads), found with one dry forward pass.

A dry pass records, in the order modules finish, a fingerprint of each module's output (shape and two sums,
taken at hook time so later in-place ops cannot change them). Two modules whose fingerprints agree give the
same tensor; the input is random (from a private generator) so that agreement is not a coincidence of zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Event:
    """One module finishing its forward in the dry pass."""

    path: str
    shape: tuple[int, ...]  # per-sample
    fingerprint: tuple
    seq: int  # position among module starts and ends


def _area(shape: tuple[int, ...]) -> int:
    return shape[1] * shape[2]


def _fingerprint(t: torch.Tensor) -> tuple:
    flat = t.detach().float().reshape(len(t), -1)
    return flat.shape[1], float(flat.sum()), float(flat.abs().sum())


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class DryPass:
    """Runs `model` once on a random batch and records every module's input and output."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        self.events: list[Event] = []
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, tuple] = {}  # first tensor of every output, also tuples (HF layers)
        self.inputs: dict[str, Event] = {}
        self.seq = 0
        handles = []
        for path, module in model.named_modules():
            if path:
                handles += [module.register_forward_pre_hook(self._start(path)), module.register_forward_hook(self._hook(path))]
        param = next(model.parameters(), None)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, *input_shape, generator=generator).to(param.device if param is not None else "cpu")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        self.logits = _fingerprint(logits) if isinstance(logits, torch.Tensor) else None

    def _start(self, path: str):
        def record(_module, inputs):
            self.seq += 1
            if inputs and isinstance(inputs[0], torch.Tensor):
                self.inputs[path] = Event(path, tuple(inputs[0].shape[1:]), _fingerprint(inputs[0]), self.seq)
        return record

    def _hook(self, path: str):
        def record(_module, _inputs, out):
            self.seq += 1
            self.calls[path] = self.calls.get(path, 0) + 1
            tensor = _first_tensor(out)
            if tensor is None:
                return
            self.outputs[path] = _fingerprint(tensor)
            if isinstance(out, torch.Tensor):
                self.events.append(Event(path, tuple(out.shape[1:]), _fingerprint(out), self.seq))
        return record

    def once(self, path: str) -> bool:
        """A tap captures a module's latest output, so only modules that ran once are safe taps."""
        return self.calls.get(path) == 1

    def latest_equal(self, before: int, fingerprint: tuple, within: str = "", exclude=lambda path: False) -> str | None:
        """The last module (finished before event `before`, under `within`) that ran once and gave this tensor."""
        for event in reversed(self.events[:before]):
            inside = not within or event.path.startswith(within + ".")
            if inside and event.fingerprint == fingerprint and self.once(event.path) and not exclude(event.path):
                return event.path
        return None


def stage_ends_by_resolution(dry: DryPass) -> list[str]:
    """The module ending each resolution stage, found from the modules that shrink the feature map (their input
    is the end of the stage before) and the deepest module giving a map larger than one pixel (where pooling
    begins). Not counted: a trunk (a shrinking module holding shrinking modules of another step), a pooling to
    one pixel that more maps follow (squeeze-excitation), and a candidate inside a shrinking module of its own
    step (the block's input, not its expansion conv, ends the stage)."""
    by_end = {e.path: e for e in dry.events}
    last_map = max((e.seq for e in dry.events if len(e.shape) == 3 and _area(e.shape) > 1), default=-1)
    steps = {p: (_area(dry.inputs[p].shape), _area(e.shape)) for p, e in by_end.items()
             if p in dry.inputs and len(e.shape) == 3 and len(dry.inputs[p].shape) == 3 and dry.once(p)
             and _area(e.shape) < _area(dry.inputs[p].shape) and (_area(e.shape) > 1 or e.seq > last_map)}
    inside = lambda path, outer: path.startswith(outer + ".")  # noqa: E731
    blocks = {p: step for p, step in steps.items() if not any(inside(q, p) and steps[q] != step for q in steps)}
    ends: list[str] = []
    for path in sorted(blocks, key=lambda p: dry.inputs[p].seq):
        start = dry.inputs[path]
        end = dry.latest_equal(sum(1 for e in dry.events if e.seq < start.seq), start.fingerprint)
        if end is not None and not any(inside(end, q) for q in blocks):
            ends.append(end)
    maps = [i for i, e in enumerate(dry.events) if len(e.shape) == 3 and _area(e.shape) > 1]
    if maps:
        encloses_an_end = lambda path: any(inside(e, path) for e in ends)  # noqa: E731
        ends.append(dry.latest_equal(maps[-1] + 1, dry.events[maps[-1]].fingerprint, exclude=encloses_an_end))
    ends = [e for e in dict.fromkeys(ends) if e is not None]
    ends = [e for e in ends if not any(inside(other, e) for other in ends)]
    return sorted(ends, key=lambda path: by_end[path].seq)


def stage_ends_of_blocks(model: nn.Module, dry: DryPass) -> list[str]:
    """Transformers-style models: each child of the shallowest ModuleList of stages/layers that ran once each.
    A child returning a tuple is tapped at its last submodule giving the tuple's hidden state."""
    lists = [(path, module) for path, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) >= 2
             and all(dry.once(f"{path}.{i}") for i in range(len(module)))]
    if not lists:
        return []
    path, blocks = min(lists, key=lambda item: item[0].count("."))
    ends = []
    for i in range(len(blocks)):
        child = f"{path}.{i}"
        if any(e.path == child for e in dry.events):
            ends.append(child)
            continue
        index = len(dry.events)
        inner = dry.latest_equal(index, dry.outputs.get(child), within=child) if child in dry.outputs else None
        if inner is None:
            return []
        ends.append(inner)
    return ends


def embedding_tap(dry: DryPass) -> str | None:
    """The module whose output is exactly what the logits layer reads (the penultimate vector), if one exists.
    The innermost module giving the logits finishes first (a head's Linear before the head around it)."""
    if dry.logits is None:
        return None
    for index, event in enumerate(dry.events):
        if event.fingerprint == dry.logits and event.path in dry.inputs and dry.once(event.path):
            found = dry.latest_equal(index, dry.inputs[event.path].fingerprint)
            if found is not None:
                return found
    return None


def discover(model: nn.Module, input_shape: tuple[int, ...], stages: list[str] | None = None) -> None:
    """Set `default_taps` and `embedding_tap` on `model` where it does not declare them.

    `stages`: the stage ends a loader already knows (timm's feature_info, torchvision's layer1..4); otherwise the
    stage blocks of a ModuleList (transformers) or the ends of resolution stages found by the dry pass.
    """
    if getattr(model, "default_taps", None) and getattr(model, "embedding_tap", None):
        return
    dry = DryPass(model, input_shape)
    if not getattr(model, "default_taps", None):
        model.default_taps = stages or stage_ends_of_blocks(model, dry) or stage_ends_by_resolution(dry)
    if not getattr(model, "embedding_tap", None):
        model.embedding_tap = embedding_tap(dry)
