"""The method registry: every distillation method registers itself by name (no if/elif over names).

A method declares its parameters as a pydantic model whose fields carry a
default and a default search range (`search_range`), the feature taps it needs,
the trainable modules it adds, and either a loss over (batch, student outputs,
teacher outputs) or its own `fit` procedure built from the shared trainer.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdpipe.errors import InputError
from kdpipe.taps import Outputs, TapPair, forward_with_taps, pair_taps
from kdpipe.train import Batch, Trainer

_REGISTRY: dict[str, type[Method]] = {}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def param(default: Any, *, low: float | None = None, high: float | None = None, log: bool = False,
          choices: list | None = None, **constraints: Any) -> Any:
    """A method parameter: its default, its validation constraints and its default search range."""
    search: dict[str, Any] | None = None
    if choices is not None:
        search = {"choices": choices}
    elif low is not None and high is not None:
        search = {"low": low, "high": high, "log": log}
    return Field(default, json_schema_extra={"search": search} if search else None, **constraints)


def search_space(params: type[Params]) -> dict[str, dict[str, Any]]:
    """The default search range of every parameter that declares one."""
    space = {}
    for name, field in params.model_fields.items():
        extra = field.json_schema_extra or {}
        if isinstance(extra, dict) and extra.get("search"):
            space[name] = dict(extra["search"])
    return space


class Method:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    needs_teacher: ClassVar[bool] = True
    # False for a method whose teacher changes during training (its outputs must then be computed every step).
    cache_teacher: ClassVar[bool] = True
    # False for a method whose fit returns another module than `student` or creates its extra modules while
    # fitting (DML peers, Born-Again generations): a trained student cannot be loaded into a fresh instance.
    fit_returns_student: ClassVar[bool] = True

    def __init__(self, params: Params, *, student: nn.Module, teacher: nn.Module | None, num_classes: int,
                 input_shape: tuple[int, ...], taps=None):
        self.params = params
        self.student = student
        self.teacher = teacher
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.taps = taps  # the pipeline's `distill.taps` section (TapsConfig) or None for the models' defaults

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        """Raise InputError for pipeline settings this method cannot work with."""
        if cls.needs_teacher and pipeline.teacher is None:
            raise InputError("teacher", f"method '{cls.name}' distills from a teacher: give a 'teacher' section")

    @classmethod
    def check_models(cls, pipeline, *, student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...]) -> None:
        """Raise InputError for models this method cannot work with (runs in `prepare`, before any run starts)."""

    def student_taps(self) -> list[str]:
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def extra_modules(self) -> nn.Module | None:
        """Trainable modules the method adds (regressors, discriminators): trained and checkpointed, never exported."""
        return None

    def loss(self, batch: Batch, student: Outputs, teacher: Outputs | None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def fit(self, trainer: Trainer, label: str = "student") -> nn.Module:
        """The usual procedure: teacher outputs from the cache (or online, see `cache_teacher`), then the student trained on `loss`."""
        teacher_outputs = trainer.teacher_step(self.teacher, self.teacher_taps(), self.cache_teacher) if self.teacher else None
        student_taps = self.student_taps()

        def step(batch: Batch):
            student_out = forward_with_taps(self.student, batch.x, student_taps)
            teacher_out = teacher_outputs(batch) if teacher_outputs is not None else None
            return self.loss(batch, student_out, teacher_out)

        trainer.fit(self.student, step, extra=self.extra_modules(), label=label)
        return self.student


class FeatureMethod(Method):
    """A method comparing student and teacher features at paired taps: `distill.taps` or the models' defaults.

    `self.pairs` holds the pairs with their shapes; `check_pair` rejects a pair the method cannot compare.
    """

    @classmethod
    def default_positions(cls, count: int) -> list[int]:
        """Which of the student's `count` default taps to use (each paired with the teacher's at the same relative depth)."""
        return list(range(count))

    @classmethod
    def check_pair(cls, pair: TapPair, params: Params) -> None:
        """Raise InputError when the method cannot compare the pair's shapes."""

    @classmethod
    def tap_pairs(cls, params: Params, student: nn.Module, teacher: nn.Module, taps, input_shape) -> list[TapPair]:
        pairs = pair_taps(student, teacher, taps, tuple(input_shape), cls.default_positions)
        for pair in pairs:
            cls.check_pair(pair, params)
        return pairs

    @classmethod
    def check_models(cls, pipeline, *, student, teacher, input_shape) -> None:
        if teacher is not None:
            cls.tap_pairs(cls.Params(**pipeline.distill.params), student, teacher, pipeline.distill.taps, input_shape)

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


@functools.cache
def _import_method_modules() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def registry() -> dict[str, type[Method]]:
    # Every method module, even when one was imported directly before (kdpipe.methods.ban): not only the first.
    _import_method_modules()
    return _REGISTRY


def get_method(name: str) -> type[Method]:
    return registry()[name]
