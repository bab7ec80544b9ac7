"""Frozen-teacher outputs computed once and reused across epochs, trials and worker processes.

The teacher is frozen and the training data carries no random augmentation, so
its logits and tapped features over the training split never change: one
forward pass replaces one per step of every epoch. In memory, the cache is keyed
by the teacher object and taps; on disk (optional), by a content hash that
separate processes can share.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from kdpipe.taps import Outputs


def teacher_fingerprint(teacher: nn.Module, data_fingerprint: str, taps: list[str]) -> str:
    """Content hash of the teacher's weights, the data and the taps."""
    digest = hashlib.sha256(data_fingerprint.encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr(sorted(taps)).encode())
    return digest.hexdigest()[:32]


class TeacherOutputCache:
    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory else None
        self._memory: dict[tuple, Outputs] = {}
        self.forward_passes = 0  # full teacher passes over a training split: tests and benchmarks count them

    def get(self, teacher: nn.Module, x: torch.Tensor, taps: list[str], data_fingerprint: str | None = None) -> Outputs:
        key = (id(teacher), id(x), tuple(taps))
        if key in self._memory:
            return self._memory[key]
        path = None
        if self.directory is not None and data_fingerprint is not None:
            path = self.directory / f"{teacher_fingerprint(teacher, data_fingerprint, taps)}.pt"
        if path is not None and path.is_file():
            stored = torch.load(path, map_location=x.device, weights_only=True)
            outputs = Outputs(stored["logits"], stored["features"])
        else:
            outputs = self._compute(teacher, x, taps)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save({"logits": outputs.logits.cpu(), "features": {k: v.cpu() for k, v in outputs.features.items()}}, tmp)
                os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        self._memory[key] = outputs
        return outputs

    def _compute(self, teacher: nn.Module, x: torch.Tensor, taps: list[str]) -> Outputs:
        from kdpipe.train import predict

        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.forward_passes += 1
        return predict(teacher, x, taps=taps)
