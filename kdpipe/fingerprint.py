"""One hashing helper for every content-addressed cache (trained teacher, teacher outputs, teacher ONNX, data).

Caches are keyed by what their entry was computed from, never by object identity: two networks with the
same weights share an entry, and a freed network's id reused by a new one can never alias it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_content(path: Path) -> dict[str, str]:
    """A file's sha256, or every file's in a folder by relative path: what they hold, not where they are."""
    path = Path(path)
    if path.is_file():
        return {".": sha256_file(path)}
    return {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}


def module_content(name: str) -> dict[str, Any]:
    """A module by what defines it: its source file's sha256 and its distributions' versions."""
    spec = importlib.util.find_spec(name)
    source = spec.origin if spec is not None and spec.has_location else None
    top = name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    return {"module": name, "source": sha256_file(Path(source)) if source else None,
            "versions": {d: importlib.metadata.version(d) for d in sorted(set(dists))}}
