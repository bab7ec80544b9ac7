"""Training-batch augmentation with kornia: batched on the training device, random parameters per sample.

Images enter in [0, 1] (before normalization) and leave at the same size, so
the teacher and the student see exactly the batch that comes out.

Teacher views (kdpipe.teacher_views) record parameters instead: `draw` takes kornia's own parameters for many
samples at once (each step's `forward_parameters`), and `replay` applies any rows of them to any batch
(`forward(x, params=...)`), so a recorded view is re-made exactly, whatever batch its image lands in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import nn

from kdpipe.config_data import (AugmentStep, ColorJitter, CutoutSettings, HorizontalFlip, RandAugmentSettings,
                                RandomCrop, RandomResizedCrop)
from kdpipe.data.strong import Cutout, RandAugment
from kdpipe.errors import InputError
from kdpipe.plugins import load_plugins


@dataclass(frozen=True)
class AugmentKind:
    """A step of `data.augment`: its parameters (the step's keys in a pipeline file) and `build(params, (H, W))`,
    a kornia augmentation that keeps the image size (teacher views draw and replay its parameters)."""

    params: type[BaseModel]
    build: Callable[[BaseModel, tuple[int, int]], nn.Module]


def _kornia():
    import kornia.augmentation

    return kornia.augmentation


BUILT_IN_STEPS = {
    "random_crop": AugmentKind(RandomCrop, lambda p, size: _kornia().RandomCrop(size, padding=p.padding,
                                                                                padding_mode=p.padding_mode)),
    "hflip": AugmentKind(HorizontalFlip, lambda p, size: _kornia().RandomHorizontalFlip(p=p.p)),
    "random_resized_crop": AugmentKind(RandomResizedCrop, lambda p, size: _kornia().RandomResizedCrop(
        size, scale=tuple(p.scale), ratio=tuple(p.ratio))),
    "color_jitter": AugmentKind(ColorJitter, lambda p, size: _kornia().ColorJitter(p.brightness, p.contrast,
                                                                                   p.saturation, p.hue, p=p.p)),
    "randaugment": AugmentKind(RandAugmentSettings, lambda p, size: RandAugment(p)),
    "cutout": AugmentKind(CutoutSettings, Cutout),
}


@functools.cache
def augment_steps() -> dict[str, AugmentKind]:
    """The built-in steps and the plugins' (entry points kdpipe.augment), loaded once."""
    steps = dict(BUILT_IN_STEPS)
    for plugin in load_plugins("kdpipe.augment", steps, lambda _, v: isinstance(v, AugmentKind),
                               "a kdpipe.data.augment.AugmentKind"):
        steps[plugin.name] = plugin.value
    return steps


def _module(step: AugmentStep, size: tuple[int, int]) -> nn.Module:
    return augment_steps()[step.name].build(step.params, size)


@contextlib.contextmanager
def _one_cpu_thread(x: torch.Tensor):
    """kornia's steps on a CPU batch run on one thread: a batch of small images is too little work to share,
    and while the cores are busy (DataLoader workers decoding, other jobs) each of kornia's parallel regions
    waits for a core (crop + flip of 128×3×32×32 on a loaded 2-core machine: 3-9 ms a batch on one thread,
    30-80 ms on two)."""
    if x.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# kornia's record of the input shape (N, C, H, W); a replayed batch gets its own N.
INPUT_SHAPE = "forward_input_shape"


@dataclass
class AugmentParams:
    """kornia's parameters for a set of samples, per step: the per-sample tensors (one row per sample) and the
    values kornia draws once per call (the input shape; ColorJitter's order of its four adjustments), which
    every sample of one draw shares."""

    per_sample: list[dict[str, torch.Tensor]]
    shared: list[dict[str, torch.Tensor]]

    def rows(self, index: torch.Tensor) -> AugmentParams:
        return AugmentParams([{k: v[index.to(v.device)] for k, v in step.items()} for step in self.per_sample],
                             self.shared)

    def to(self, device: torch.device) -> AugmentParams:
        return AugmentParams([{k: v.to(device) for k, v in step.items()} for step in self.per_sample], self.shared)


class Augmentation:
    """The configured steps in order; each call draws its random parameters from a seed taken from `generator`,
    so a run's augmented batches repeat with its seed."""

    def __init__(self, steps: list[AugmentStep], sample_shape: tuple[int, ...], key: str = "data.augment"):
        """`key`: the pipeline's list the steps come from (data.augment or data.strong_augment), for errors."""
        if len(sample_shape) != 3:
            raise InputError(key, f"augmentation needs images (C×H×W samples), got samples of shape {sample_shape}")
        channels, height, width = sample_shape
        for i, step in enumerate(steps):
            if step.name == "color_jitter" and channels != 3 and (step.params.saturation or step.params.hue):
                raise InputError(f"{key}.{i}.color_jitter",
                                 f"saturation and hue need 3 channels, the images have {channels}")
            if step.name == "cutout" and step.params.fill is not None and len(step.params.fill) != channels:
                raise InputError(f"{key}.{i}.cutout.fill", f"expected {channels} value(s), one per channel of the "
                                                           f"images, got {len(step.params.fill)}")
        self.steps = [step.name for step in steps]
        self.settings = [step.model_dump(mode="json", exclude_none=True) for step in steps]
        self.sample_shape = tuple(sample_shape)
        self.module = nn.Sequential(*(_module(step, (height, width)) for step in steps))
        self._per_sample_keys = [self._sample_keys(m) for m in self.module]

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        # kornia draws its parameters from the CPU generator, whatever the device of the images.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            with _one_cpu_thread(x):
                return self.module(x)

    def draw(self, count: int, generator: torch.Generator) -> AugmentParams:
        """Parameters for `count` samples in one draw per step (a seed taken from `generator`), on the CPU."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        shape = torch.Size((count, *self.sample_shape))  # every step keeps the size: each draws for this shape
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            drawn = [m.forward_parameters(shape) for m in self.module]
        return AugmentParams([{k: v for k, v in p.items() if k in keys} for p, keys in zip(drawn, self._per_sample_keys)],
                             [{k: v for k, v in p.items() if k not in keys} for p, keys in zip(drawn, self._per_sample_keys)])

    def replay(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """`x` augmented with recorded parameters, one row per sample of `x` (`params.rows(...)` of a draw)."""
        with _one_cpu_thread(x):
            for module, per_sample, shared in zip(self.module, params.per_sample, params.shared):
                step = {k: v.to(x.device) for k, v in per_sample.items()}
                step.update(shared)
                if INPUT_SHAPE in shared:
                    step[INPUT_SHAPE] = torch.tensor([len(x), *shared[INPUT_SHAPE].tolist()[1:]])
                x = module(x, params=step)
        return x

    def _sample_keys(self, module: nn.Module) -> set[str]:
        """The parameters kornia draws per sample: those whose leading dimension follows the batch size."""
        with torch.random.fork_rng(devices=[]):
            two, three = (module.forward_parameters(torch.Size((n, *self.sample_shape))) for n in (2, 3))
        return {k for k in two if two[k].dim() and len(two[k]) == 2 and three[k].dim() and len(three[k]) == 3}
