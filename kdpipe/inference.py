"""Eval-mode forward passes in batches: predictions and accuracy of a model on tensors."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.taps import Outputs, forward_with_taps


def _kept(outputs: Outputs) -> Outputs:
    """Outputs that stay valid after the model's next call: a model compiled for CUDA graphs (distill.compile on
    CUDA) writes every call's outputs into the same memory, so its chunks are copied out."""
    if not outputs.logits.is_cuda:
        return outputs
    return Outputs(outputs.logits.clone(), {k: v.clone() for k, v in outputs.features.items()})


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, taps: list[str] | None = None) -> Outputs:
    """Eval-mode outputs (logits and tapped features) over `x`, in batches; the model's mode is restored."""
    was_training = model.training
    model.eval()
    chunks = [_kept(forward_with_taps(model, x[i:i + batch_size], taps or [])) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return Outputs(
        torch.cat([c.logits for c in chunks]),
        {k: torch.cat([c.features[k] for c in chunks]) for k in (taps or [])},
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).logits.argmax(1) == y).float().mean().item()
