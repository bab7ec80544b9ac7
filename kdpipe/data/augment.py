"""Training-batch augmentation with kornia: batched on the training device, random parameters per sample.

Images enter in [0, 1] (before normalization) and leave at the same size, so
the teacher and the student see exactly the batch that comes out.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.config import AugmentStep
from kdpipe.errors import InputError


def _module(step: AugmentStep, size: tuple[int, int]) -> nn.Module:
    import kornia.augmentation as K

    p = step.params
    if step.name == "random_crop":
        return K.RandomCrop(size, padding=p.padding, padding_mode=p.padding_mode)
    if step.name == "hflip":
        return K.RandomHorizontalFlip(p=p.p)
    if step.name == "random_resized_crop":
        return K.RandomResizedCrop(size, scale=tuple(p.scale), ratio=tuple(p.ratio))
    return K.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue, p=p.p)


class _Steps(nn.Sequential):
    """The kornia steps in order. On the CPU they run on one thread: a batch of small images is too little work
    to share, and while the cores are busy (DataLoader workers decoding, other jobs) each of kornia's parallel
    regions waits for a core (crop + flip of 128×3×32×32 on a loaded 2-core machine: 3-9 ms a batch on one
    thread, 30-80 ms on two)."""

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().forward(x)
        finally:
            torch.set_num_threads(threads)


class Augmentation:
    """The configured steps in order; each call draws its random parameters from a seed taken from `generator`,
    so a run's augmented batches repeat with its seed."""

    def __init__(self, steps: list[AugmentStep], sample_shape: tuple[int, ...]):
        if len(sample_shape) != 3:
            raise InputError("data.augment", f"augmentation needs images (C×H×W samples), got samples of shape {sample_shape}")
        channels, height, width = sample_shape
        for i, step in enumerate(steps):
            if step.name == "color_jitter" and channels != 3 and (step.params.saturation or step.params.hue):
                raise InputError(f"data.augment.{i}.color_jitter", f"saturation and hue need 3 channels, the images have {channels}")
        self.steps = [step.name for step in steps]
        self.module = _Steps(*(_module(step, (height, width)) for step in steps))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        # kornia draws its parameters from the CPU generator, whatever the device of the images.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.module(x)
