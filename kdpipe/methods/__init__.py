"""The method registry: every distillation method registers itself by name (no if/elif over names).

A method declares its parameters as a pydantic model whose fields carry a default, a default search range
(`search`) and, where a parameter acts only under some setting of another, that condition (`when`); the
feature taps it needs; and its training as phases of updates (kdpipe.train.Phase, Update), which the one
training loop runs. A method is an nn.Module holding every module it trains (the student, and regressors,
discriminators, peers, generations): its state_dict is the whole trained state, and `exported()` the module the
pipeline exports.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from kdpipe.config import Strict
from kdpipe.config_base import param  # noqa: F401 - methods (plugins too) import it from here
from kdpipe.errors import InputError
from kdpipe.plugins import BUILT_IN, load_plugins, loaded
from kdpipe.taps import Outputs, TapPair, forward_with_taps, pair_taps
from kdpipe.train import Batch, Phase, Trainer, Update

_REGISTRY: dict[str, type[Method]] = {}


class Params(Strict):
    """A method's parameters: unknown keys and booleans where numbers belong are refused (kdpipe.config.Strict)."""


FAMILIES = ("logit", "feature", "relation", "adversarial", "collaborative", "baseline")


class Method(nn.Module):
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # What `kdpipe methods` lists: the paper (authors, title), its year and the method's family (FAMILIES).
    paper: ClassVar[str] = ""
    year: ClassVar[int | None] = None
    family: ClassVar[str] = "logit"
    Params: ClassVar[type[Params]] = Params
    needs_teacher: ClassVar[bool] = True
    # False for a method whose teacher changes during training (its outputs must then be computed every step).
    cache_teacher: ClassVar[bool] = True
    # True for a method whose loss reads the teacher only through softmax(logits / T) (a shift-invariant use): with
    # augmented data it then learns from teacher views (kdpipe.teacher_views), which keep log-probabilities.
    teacher_soft_labels: ClassVar[bool] = False
    # True for a method reading two views of each image (MLKD): its phases' batches carry the strong view too
    # (Batch.x_strong, made by data.strong_augment's steps, which such a method requires and no other accepts).
    two_views: ClassVar[bool] = False

    def __init__(self, params: Params, *, student: nn.Module, teacher: nn.Module | None, num_classes: int,
                 input_shape: tuple[int, ...], taps=None, seed: int = 0):
        """`seed`: the pipeline's, from which a method builds the networks it adds (peers, generations)."""
        super().__init__()
        self.params = params
        self.student = student
        # The frozen teacher is read, never trained: outside the method's module tree and state.
        object.__setattr__(self, "teacher", teacher)
        self.seed = seed
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.taps = taps  # the pipeline's `distill.taps` section (TapsConfig) or None for the models' defaults
        # The epoch being trained (from 1, as the papers count), set before each one by the phases' before_epoch:
        # warm-ups and curricula (DKD, CTKD, ReviewKD) read it, and a resumed run sets it again.
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch of the method's phases, resumed epochs included."""
        self.epoch = epoch

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        """Raise InputError for pipeline settings this method cannot work with."""
        if cls.needs_teacher and pipeline.teacher is None:
            raise InputError("teacher", f"method '{cls.name}' distills from a teacher: give a 'teacher' section")
        if cls.two_views and not pipeline.data.strong_augment:
            raise InputError("data.strong_augment", f"method '{cls.name}' reads a weak and a strong view of each "
                                                    "image: give the strong view's steps (e.g. [randaugment, cutout])")
        if not cls.two_views and pipeline.data.strong_augment:
            raise InputError("data.strong_augment", f"method '{cls.name}' reads one view of each image: move the "
                                                    "steps to data.augment, or leave data.strong_augment out")

    @classmethod
    def check_models(cls, pipeline, *, student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...]) -> None:
        """Raise InputError for models this method cannot work with (runs in `prepare`, before any run starts)."""

    @classmethod
    def reads_teacher_soft_labels(cls, params: Params) -> bool:
        """teacher_soft_labels, except under logit standardization (`logit_stand`): it standardizes the teacher's raw
        logits, and standardized truncated log-probabilities (teacher views) are not standardized logits."""
        return cls.teacher_soft_labels and not getattr(params, "logit_stand", False)

    def student_taps(self) -> list[str]:
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def extra_modules(self) -> nn.Module | None:
        """The modules it trains besides the exported one (regressors, discriminators, other peers)."""
        return None

    def loss(self, batch: Batch, student: Outputs, teacher: Outputs | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def student_update(self, trainer: Trainer, label: str) -> Update:
        """The student (and the method's extra modules) trained on `loss` against the frozen teacher's outputs."""
        teacher = (trainer.teacher(self.teacher, self.teacher_taps(), self.cache_teacher,
                                   self.reads_teacher_soft_labels(self.params)) if self.teacher else None)
        student_taps = self.student_taps()

        def loss(batch: Batch, shared: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            student_out = forward_with_taps(self.student, batch.x, student_taps)
            return self.loss(batch, student_out, teacher(batch) if teacher is not None else None)

        extra = self.extra_modules()
        return Update(label, [self.student] + ([extra] if extra is not None else []), loss)

    def phases(self, trainer: Trainer, label: str = "student") -> Iterator[Phase]:
        """The method's training, phase by phase; the usual one: the student on `loss` for the pipeline's epochs."""
        yield Phase(label, [self.student_update(trainer, label)], trainer.epochs, evaluate={label: self.student},
                    before_epoch=self.start_epoch, two_views=self.two_views)

    def exported(self) -> nn.Module:
        """The module the pipeline exports once the phases ran."""
        return self.student

    def fit(self, trainer: Trainer, label: str = "student") -> nn.Module:
        """Train every phase; returns `exported()`."""
        trainer.run(self.phases(trainer, label))
        return self.exported()


class FeatureMethod(Method):
    """A method comparing student and teacher features at paired taps: `distill.taps` or the models' defaults.

    `self.pairs` holds the pairs with their shapes; `check_pair` rejects a pair the method cannot compare.
    """

    @classmethod
    def default_pairs(cls, student: list[tuple[str, tuple]], teacher: list[tuple[str, tuple]]) -> list[tuple[int, int]]:
        """(student index, teacher index) pairs among the models' default taps (stage ends, with their shapes)."""
        raise NotImplementedError

    @classmethod
    def check_pair(cls, pair: TapPair, params: Params) -> None:
        """Raise InputError when the method cannot compare the pair's shapes."""

    @classmethod
    def tap_pairs(cls, params: Params, student: nn.Module, teacher: nn.Module, taps, input_shape) -> list[TapPair]:
        pairs = pair_taps(student, teacher, taps, tuple(input_shape), cls.default_pairs)
        for pair in pairs:
            cls.check_pair(pair, params)
        return pairs

    @classmethod
    def check_models(cls, pipeline, *, student, teacher, input_shape) -> None:
        if teacher is not None:
            cls.tap_pairs(pipeline.distill.params, student, teacher, pipeline.distill.taps, input_shape)

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        self.pairs = self.tap_pairs(params, self.student, self.teacher, self.taps, self.input_shape)

    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(p.student for p in self.pairs))

    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(p.teacher for p in self.pairs))


def method(name: str):
    """Class decorator registering a Method under `name`."""

    def register(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise RuntimeError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def _is_method(name: str, value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, Method)


@functools.cache
def _discover() -> None:
    """Every method module of kdpipe (even when one was imported directly before, kdpipe.methods.ban: not only the
    first), then the plugins' methods (entry points kdpipe.methods), once."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for plugin in load_plugins("kdpipe.methods", set(_REGISTRY), _is_method, "a kdpipe.methods.Method subclass"):
        plugin.value.name = plugin.name
        _REGISTRY.setdefault(plugin.name, plugin.value)  # @method(NAME) in the plugin's module may have put it there


def registry() -> dict[str, type[Method]]:
    _discover()
    return _REGISTRY


def origin(name: str) -> str:
    """Where a method comes from: kdpipe, or the plugin's distribution and version."""
    _discover()
    return loaded("kdpipe.methods").get(name, BUILT_IN)


def get_method(name: str) -> type[Method]:
    return registry()[name]
