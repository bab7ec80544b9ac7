"""`export.input: uint8`: an ONNX graph that takes decoded images and does the scaling and normalization itself.

The graph's input is uint8 N×C×H×W, the layout of the float graph and of kdpipe's stored images, so the two
contracts differ only in dtype and in who scales and normalizes. The adapter repeats the training data's
conversion operation for operation (divide by 255, subtract the mean, divide by the std), so the uint8 graph
predicts what the float graph predicts on the same images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from kdpipe.errors import InputError

PIXEL_LEVELS = 255.0


class InputAdapter(nn.Module):
    """uint8 images N×C×H×W in, the model's logits out: model((images / divisor - mean) / std).

    `mean`/`std`: one value, or one per channel, of the normalization the model was trained with, in the scaled
    units; `divisor` maps pixel values to those units (255: [0, 1]).
    """

    def __init__(self, model: nn.Module, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 divisor: float = PIXEL_LEVELS):
        super().__init__()
        self.model = model
        self.divisor = divisor
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, images):
        return self.model((images.to(torch.float32) / self.divisor - self.mean) / self.std)


def holds_8bit_images(data) -> bool:
    """Whether `data` (kdpipe.data.Splits) holds 8-bit images (uint8 C×H×W samples), which a uint8 graph takes."""
    return data.conversion.divisor == PIXEL_LEVELS and len(data.input_shape) == 3


def check_uint8_input(data) -> None:
    """InputError (exit 2) unless `data` (kdpipe.data.Splits) holds 8-bit images a uint8 graph can take."""
    shape = data.input_shape
    if not holds_8bit_images(data):
        stored = "uint8" if data.conversion.divisor == PIXEL_LEVELS else "float"
        raise InputError("export.input", f"uint8 needs 8-bit images (uint8 C×H×W samples), the data holds {stored} "
                                         f"samples of shape {shape} ({data.provenance.get('source', 'data')}); "
                                         f"use input: float")


def for_export(model: nn.Module, data, graph_input: str) -> nn.Module:
    """The module to export for `export.input`: the model itself (float) or wrapped in an InputAdapter (uint8)."""
    if graph_input != "uint8":
        return model
    mean, std = data.normalization or (0.0, 1.0)
    return InputAdapter(model, mean, std, data.conversion.divisor).eval()


def graph_inputs(data, split: str, graph_input: str) -> torch.Tensor:
    """`data`'s `split` ("val" or "test") as the graph takes it: model-ready floats for a float graph; for a uint8
    graph, the stored 8-bit images themselves, exactly the decoded bytes."""
    return getattr(data, f"stored_{split}" if graph_input == "uint8" else f"x_{split}")


def input_contract(data, graph_input: str) -> dict[str, str]:
    """What the graph's `input` is, for the ONNX file's metadata_props (every value a string; mean and std as JSON)."""
    mean, std = data.normalization or (None, None)
    shape = "×".join(["N", *map(str, data.input_shape)])
    layout = "N×C×H×W" if len(data.input_shape) == 3 else "N×features"
    normalized = f"mean {mean}, std {std}" if mean is not None else None
    if graph_input == "uint8":
        says = (f"uint8 {shape} ({layout}): decoded 8-bit images, 0-255; the graph divides by 255"
                + (f", then normalizes with {normalized}" if normalized else ""))
    else:
        scaled = "images divided by 255" if data.conversion.divisor == PIXEL_LEVELS else "the data's samples"
        says = f"float32 {shape} ({layout}): {scaled}" + (f", normalized with {normalized}" if normalized else "") \
            + ", by the caller"
    return {"kdpipe.input": says, "kdpipe.input_dtype": "uint8" if graph_input == "uint8" else "float32",
            "kdpipe.input_shape": shape, "kdpipe.normalize_mean": json.dumps(mean), "kdpipe.normalize_std": json.dumps(std)}
