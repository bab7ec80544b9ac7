"""One hashing helper for every content-addressed cache (trained teacher, teacher outputs, teacher ONNX, data).

Caches are keyed by what their entry was computed from, never by object identity: two networks with the
same weights share an entry, and a freed network's id reused by a new one can never alias it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn


class Fingerprint:
    """An incremental sha256 over tensors, arrays, modules' weights and JSON-able values."""

    def __init__(self, *parts: Any):
        self._digest = hashlib.sha256()
        self.add(*parts)

    def add(self, *parts: Any) -> Fingerprint:
        for part in parts:
            if isinstance(part, nn.Module):
                for name, tensor in part.state_dict().items():
                    self._digest.update(name.encode())
                    self._add_tensor(tensor)
            elif isinstance(part, torch.Tensor):
                self._add_tensor(part)
            elif isinstance(part, np.ndarray):
                self._digest.update(f"{part.dtype}{part.shape}".encode())
                self._digest.update(np.ascontiguousarray(part).tobytes())
            elif isinstance(part, bytes):
                self._digest.update(part)
            else:
                self._digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        return self

    def _add_tensor(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        self._digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        self._digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())

    def hexdigest(self, length: int = 32) -> str:
        return self._digest.hexdigest()[:length]


def fingerprint(*parts: Any, length: int = 32) -> str:
    """The content hash of `parts` (modules by their weights, tensors and arrays by their bytes, values as JSON)."""
    return Fingerprint(*parts).hexdigest(length)
