"""`export.input: uint8`: an ONNX graph that takes decoded images and does the scaling and normalization itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputAdapter(nn.Module):
    """uint8 images N×C×H×W in, the model's logits out: model((images * scale - mean) / std).

    `mean`/`std`: one value, or one per channel, of the normalization the model was trained with, in the scaled
    units; `scale` maps pixel values to those units (1/255: [0, 1]).
    """

    def __init__(self, model: nn.Module, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 scale: float = 1 / 255):
        super().__init__()
        self.model = model
        self.scale = scale
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, images):
        return self.model((images.to(torch.float32) * self.scale - self.mean) / self.std)
