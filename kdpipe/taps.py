"""Feature taps: forward hooks that capture intermediate outputs by module path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdpipe.errors import InputError


@dataclass
class Outputs:
    """A model's logits and the tapped features, keyed by module path."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, index: torch.Tensor) -> Outputs:
        return Outputs(self.logits[index], {k: v[index] for k, v in self.features.items()})

    def detach(self) -> Outputs:
        return Outputs(self.logits.detach(), {k: v.detach() for k, v in self.features.items()})


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_taps(model: nn.Module, paths: list[str], key: str) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules or not p]
    if missing:
        raise InputError(key, f"no module '{missing[0]}' in the model; available: {', '.join(module_paths(model))}")
    return [modules[p] for p in paths]


def forward_with_taps(model: nn.Module, x: torch.Tensor, paths: list[str], key: str = "distill.taps") -> Outputs:
    """Run `model` on `x`, capturing the output of each module named in `paths`."""
    if not paths:
        return Outputs(model(x))
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path, module in zip(paths, resolve_taps(model, paths, key)):
        handles.append(module.register_forward_hook(lambda _m, _i, out, path=path: captured.__setitem__(path, out)))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return Outputs(logits, {p: captured[p] for p in paths})
