"""Frozen-teacher outputs computed once and reused across epochs, trials and worker processes.

The teacher is frozen and the training data carries no random augmentation, so
its logits and tapped features over the training split never change: one
forward pass replaces one per step of every epoch. In memory, the cache is keyed
by the teacher object, the data tensor, the taps and the autocast dtype; on disk
(optional), by a content hash that separate processes can share. Outputs larger
than the memory budget stay on disk, memory-mapped, and each batch reads its
rows from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdpipe.atomic import save_torch
from kdpipe.taps import Outputs


def teacher_fingerprint(teacher: nn.Module, data_fingerprint: str, taps: list[str], autocast: torch.dtype | None = None) -> str:
    """Content hash of the teacher's weights, the data, the taps and the autocast dtype of the pass."""
    digest = hashlib.sha256(data_fingerprint.encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(sorted(taps)).encode())
    if autocast is not None:
        digest.update(str(autocast).encode())
    return digest.hexdigest()[:32]


@dataclass
class SpilledOutputs(Outputs):
    """Outputs memory-mapped from the disk cache; a selection is read from disk and moved to `device`."""

    device: torch.device = torch.device("cpu")

    def select(self, index: torch.Tensor) -> Outputs:
        return Outputs(self.logits[index.cpu()].to(self.device),
                       {k: v[index.cpu()].to(self.device) for k, v in self.features.items()})


def nbytes(outputs: Outputs) -> int:
    return sum(t.numel() * t.element_size() for t in (outputs.logits, *outputs.features.values()))


def teacher_pass(teacher: nn.Module, x: torch.Tensor, taps: list[str], autocast: torch.dtype | None = None,
                 channels_last: bool = False) -> Outputs:
    """The frozen teacher's eval-mode outputs on `x` (no grad; under autocast when a dtype is given), as float32."""
    from kdpipe.train import predict

    for p in teacher.parameters():
        p.requires_grad_(False)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    context = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        outputs = predict(teacher, x, taps=taps)
    return Outputs(outputs.logits.float(), {k: v.float() for k, v in outputs.features.items()})


class TeacherOutputCache:
    def __init__(self, directory: Path | None = None, memory_budget_mb: float | None = None):
        """`directory`: disk cache shared by processes (None: memory only, spilling to a private temporary
        directory). `memory_budget_mb`: the most teacher outputs held in memory (None: no limit)."""
        self.directory = Path(directory) if directory else None
        self.memory_budget = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
        self._memory: dict[tuple, Outputs] = {}
        self._resident_bytes = 0
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.forward_passes = 0  # full teacher passes over a training split: tests and benchmarks count them
        self.spilled = 0  # entries kept on disk because they exceeded the memory budget

    def get(self, teacher: nn.Module, x: torch.Tensor, taps: list[str], data_fingerprint: str | None = None,
            autocast: torch.dtype | None = None, channels_last: bool = False) -> Outputs:
        key = (id(teacher), id(x), tuple(taps), autocast)
        if key in self._memory:
            return self._memory[key]
        path = None
        if self.directory is not None and data_fingerprint is not None:
            path = self.directory / f"{teacher_fingerprint(teacher, data_fingerprint, taps, autocast)}.pt"
        if path is not None and path.is_file():
            outputs = self._load(path, x.device)
        else:
            outputs = self._compute(teacher, x, taps, autocast, channels_last)
            if path is not None:
                self._save(outputs, path)
        if self.memory_budget is not None and self._resident_bytes + nbytes(outputs) > self.memory_budget:
            outputs = self._spill(outputs, path, x.device)
        elif isinstance(outputs, SpilledOutputs):  # fits after all: bring it into memory
            outputs = Outputs(outputs.logits.to(x.device), {k: v.to(x.device) for k, v in outputs.features.items()})
        if not isinstance(outputs, SpilledOutputs):
            self._resident_bytes += nbytes(outputs)
        self._memory[key] = outputs
        return outputs

    def _compute(self, teacher, x, taps, autocast, channels_last) -> Outputs:
        self.forward_passes += 1
        return teacher_pass(teacher, x, taps, autocast, channels_last)

    def _spill(self, outputs: Outputs, path: Path | None, device: torch.device) -> SpilledOutputs:
        if isinstance(outputs, SpilledOutputs):
            return outputs
        if path is None:
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="kdpipe-teacher-")
            path = Path(self._scratch.name) / f"{len(self._memory)}.pt"
            self._save(outputs, path)
        self.spilled += 1
        return self._load(path, device)

    @staticmethod
    def _save(outputs: Outputs, path: Path) -> None:
        save_torch({"logits": outputs.logits.cpu(), "features": {k: v.cpu() for k, v in outputs.features.items()}}, path)

    @staticmethod
    def _load(path: Path, device: torch.device) -> SpilledOutputs:
        # Memory-mapped: pages are read when batches touch them; `get` copies it to `device` when it fits the budget.
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return SpilledOutputs(stored["logits"], stored["features"], device)
