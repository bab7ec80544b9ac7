"""Strong augmentation (FixMatch, Sohn et al. 2020; used by MLKD): RandAugment and Cutout, batched with torch and
kornia's functional ops, random parameters per sample.

kornia.augmentation.auto.RandAugment cannot be set to FixMatch's policy (its policy holds kornia's own ops with
fixed magnitude ranges and draws one magnitude level for the whole batch), so the policy is built here from kornia's
ops: FixMatch's 14 ops, two drawn per image with replacement, each at a magnitude drawn uniformly from its range
(METHODS.md, MLKD). Both steps follow kornia's protocol, `forward_parameters(shape)` and `forward(x, params=...)`,
so teacher views (kdpipe.data.augment's draw and replay) record and replay them like kornia's own steps.

Rotate, shear, translate and posterize are kornia's functional ops; Equalize and Sharpness follow PIL's algorithms
in batched torch (kornia's loop over images: 10-50× slower on small images). Differences from FixMatch's PIL ops,
in [0, 1] floats instead of 8-bit images: results are not rounded to 8 bits; Contrast blends with the grayscale
mean as a float (PIL rounds it to an integer); rotate, shear and translate sample bilinearly (PIL: nearest) and
fill with 0 (black, PIL's default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kdpipe.config_data import CutoutSettings, RandAugmentSettings

# Cutout's fill in MLKD's reference (8-bit RGB), and its gray (PIL's "L": 0.299 R + 0.587 G + 0.114 B) for one channel.
CUTOUT_FILL_RGB = (125.0, 123.0, 114.0)
CUTOUT_FILL_GRAY = (0.299 * 125.0 + 0.587 * 123.0 + 0.114 * 114.0,)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """N×1×H×W luma (ITU-R 601, as PIL's "L"); a one-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _per_sample(m: torch.Tensor) -> torch.Tensor:
    return m.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: base + factor·(x − base), clipped to [0, 1]."""
    return (base + _per_sample(factor) * (x - base)).clamp(0.0, 1.0)


def _auto_contrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (x - low) / spread.clamp_min(1e-12), x)  # a flat channel stays as it is


def _equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel on the 8-bit values, batched (kornia's loops over images and channels:
    0.5 s for 8 images of 8×8 on a loaded CPU). step = (pixels − count of the highest value present) // 255; lut[i]
    = (step // 2 + pixels below i) // step; step 0 (one value, or nearly) leaves the channel as it is."""
    images, channels = x.shape[:2]
    pixels = (x * 255.0).round().clamp(0, 255).long().view(images * channels, -1)
    hist = torch.zeros(images * channels, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, pixels, torch.ones_like(pixels))
    highest = pixels.amax(1, keepdim=True)
    step = (pixels.shape[1] - hist.gather(1, highest)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, pixels), pixels)
    return (out.to(x.dtype) / 255.0).view_as(x)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    from kornia.enhance import posterize

    return posterize(x, bits.long())


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: a blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (border
    pixels kept), batched (kornia's per-sample factors loop: 0.1 s for 8 images of 8×8 on a loaded CPU)."""
    channels = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(channels, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = torch.nn.functional.conv2d(x, kernel, groups=channels)
    return _blend(x, smooth, factor)


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    from kornia.geometry.transform import rotate

    return rotate(x, degrees)


def _shear(x: torch.Tensor, factor: torch.Tensor, axis: int) -> torch.Tensor:
    from kornia.geometry.transform import shear

    factors = torch.zeros(len(x), 2, dtype=x.dtype, device=x.device)
    factors[:, axis] = factor
    return shear(x, factors)


def _translate(x: torch.Tensor, fraction: torch.Tensor, axis: int) -> torch.Tensor:
    from kornia.geometry.transform import translate

    shift = torch.zeros(len(x), 2, dtype=x.dtype, device=x.device)
    shift[:, axis] = fraction * x.shape[3 - axis]  # a fraction of the width (x) or height (y), in pixels
    return translate(x, shift)


@dataclass(frozen=True)
class Op:
    """One RandAugment operation: `apply(images, magnitudes)` with one magnitude per image in [low, high]."""

    name: str
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    low: float = 0.0
    high: float = 0.0
    integer: bool = False  # Posterize: bits, drawn uniformly among low..high

    def magnitude(self, level: torch.Tensor) -> torch.Tensor:
        """The magnitude of a level drawn uniformly in [0, 1)."""
        if self.integer:
            return (self.low + torch.floor(level * (self.high - self.low + 1))).clamp(max=self.high)
        return self.low + level * (self.high - self.low)


# FixMatch's RandAugment list (METHODS.md, MLKD); photometric factors in [0.05, 0.95], signed ranges symmetric.
FIXMATCH_OPS = (
    Op("auto_contrast", _auto_contrast),
    Op("brightness", lambda x, f: _blend(x, torch.zeros_like(x), f), 0.05, 0.95),
    Op("color", lambda x, f: _blend(x, _gray(x), f), 0.05, 0.95),
    Op("contrast", lambda x, f: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f), 0.05, 0.95),
    Op("equalize", _equalize),
    Op("identity", lambda x, _: x),
    Op("posterize", _posterize, 4, 8, integer=True),
    Op("rotate", _rotate, -30.0, 30.0),
    Op("sharpness", _sharpness, 0.05, 0.95),
    Op("shear_x", lambda x, f: _shear(x, f, 0), -0.3, 0.3),
    Op("shear_y", lambda x, f: _shear(x, f, 1), -0.3, 0.3),
    # Pixels at or above the threshold (8-bit values in [0, 256]) are inverted; 256 inverts none.
    Op("solarize", lambda x, t: torch.where(x * 255.0 >= _per_sample(t), 1.0 - x, x), 0.0, 256.0),
    Op("translate_x", lambda x, f: _translate(x, f, 0), -0.3, 0.3),
    Op("translate_y", lambda x, f: _translate(x, f, 1), -0.3, 0.3),
)


class RandAugment(nn.Module):
    """`ops` operations per image, in turn: each image draws its operation (with replacement) and its level."""

    def __init__(self, settings: RandAugmentSettings):
        super().__init__()
        self.ops = settings.ops

    def forward_parameters(self, batch_shape: torch.Size) -> dict[str, torch.Tensor]:
        count = batch_shape[0]
        return {"op": torch.randint(len(FIXMATCH_OPS), (count, self.ops)), "level": torch.rand(count, self.ops)}

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = self.forward_parameters(x.shape) if params is None else params
        # Grouping by operation on the CPU: drawn there, so a batch on the GPU waits for nothing.
        chosen = params["op"].cpu()
        levels = params["level"].to(x.device, x.dtype)
        for turn in range(self.ops):
            out = x.clone()
            for number, op in enumerate(FIXMATCH_OPS):
                rows = (chosen[:, turn] == number).nonzero().squeeze(1)
                if len(rows):
                    rows = rows.to(x.device)
                    out[rows] = op.apply(x[rows], op.magnitude(levels[rows, turn])).to(x.dtype)
            x = out
        return x


def cutout(x: torch.Tensor, centre: torch.Tensor, side: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """`x` with, per image, a square of `side` pixels set to `fill` (one value per channel, in [0, 1]), placed as
    FixMatch's CutoutAbs places it: from (⌊max(0, c − side/2)⌋) to ⌊that + side⌋ on each axis, `centre` = c (row,
    column), clipped at the far border."""
    height, width = x.shape[2:]
    start = (centre - side.unsqueeze(1) / 2).clamp_min(0.0).floor()
    end = (start + side.unsqueeze(1)).floor()
    rows = torch.arange(height, device=x.device, dtype=x.dtype).view(1, height, 1)
    cols = torch.arange(width, device=x.device, dtype=x.dtype).view(1, 1, width)
    inside = ((rows >= start[:, 0].view(-1, 1, 1)) & (rows < end[:, 0].view(-1, 1, 1))
              & (cols >= start[:, 1].view(-1, 1, 1)) & (cols < end[:, 1].view(-1, 1, 1)))
    return torch.where(inside.unsqueeze(1), fill.to(x.device, x.dtype).view(1, -1, 1, 1), x)


def cutout_fill(settings: CutoutSettings, channels: int) -> tuple[float, ...]:
    """The fill as 8-bit values per channel: the configured one, else MLKD's (its gray for one channel)."""
    if settings.fill is not None:
        return tuple(settings.fill)
    return CUTOUT_FILL_RGB if channels == 3 else CUTOUT_FILL_GRAY


class Cutout(nn.Module):
    """FixMatch's CutoutAbs: a square of side U[0, max_fraction]·(shorter side) pixels, its centre uniform over the
    image, filled with one colour."""

    def __init__(self, settings: CutoutSettings, size: tuple[int, int]):
        super().__init__()
        self.settings = settings
        self.size = size

    def forward_parameters(self, batch_shape: torch.Size) -> dict[str, torch.Tensor]:
        count = batch_shape[0]
        height, width = self.size
        return {"centre": torch.rand(count, 2) * torch.tensor([height, width], dtype=torch.float32),
                "side": torch.rand(count) * self.settings.max_fraction * min(height, width)}

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = self.forward_parameters(x.shape) if params is None else params
        fill = torch.tensor(cutout_fill(self.settings, x.shape[1])) / 255.0
        return cutout(x, params["centre"].to(x.device, x.dtype), params["side"].to(x.device, x.dtype), fill)
