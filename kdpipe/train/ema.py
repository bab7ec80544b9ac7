"""An exponential moving average of a model's weights (timm's ModelEma), kept beside the model it follows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModelEMA:
    """After every optimizer step ema ← decay·ema + (1 − decay)·weights, for parameters and floating-point buffers
    (BatchNorm statistics); integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.reset()

    def reset(self) -> None:
        """Start from the model's current weights."""
        self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        live = self.model.state_dict()  # views sharing the model's storage: they follow its in-place updates
        self._floats = [(self.shadow[k], live[k]) for k in self.shadow if self.shadow[k].is_floating_point()]
        self._others = [(self.shadow[k], live[k]) for k in self.shadow if not self.shadow[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self._floats:
            torch._foreach_lerp_([s for s, _ in self._floats], [t.to(s.dtype) for s, t in self._floats],
                                 1.0 - self.decay)
        for shadow, live in self._others:
            shadow.copy_(live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average meanwhile (to be scored), its own weights again after."""
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.model.load_state_dict(raw)
