"""Feature taps: forward hooks that capture intermediate outputs by module path."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
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


@contextmanager
def _capture(model: nn.Module, paths: list[str], key: str):
    """Forward hooks storing each named module's latest output in the yielded dict while the block runs."""
    captured: dict[str, object] = {}
    handles = [module.register_forward_hook(lambda _m, _i, out, path=path: captured.__setitem__(path, out))
               for path, module in zip(paths, resolve_taps(model, paths, key))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_with_taps(model: nn.Module, x: torch.Tensor, paths: list[str], key: str = "distill.taps") -> Outputs:
    """Run `model` on `x`, capturing the output of each module named in `paths`."""
    if not paths:
        return Outputs(model(x))
    with _capture(model, paths, key) as captured:
        logits = model(x)
    for path in paths:
        if not isinstance(captured.get(path), torch.Tensor):
            got = f"gives a {type(captured[path]).__name__}" if path in captured else "did not run in the forward pass"
            raise InputError(key, f"module '{path}' {got}; a tap needs a module whose output is one tensor")
    return Outputs(logits, {p: captured[p] for p in paths})


@contextmanager
def _dry_run(model: nn.Module):
    """Eval mode without gradients for a shape-finding pass; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _zeros(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    param = next(model.parameters(), None)
    return torch.zeros(2, *input_shape, device=param.device if param is not None else "cpu")


def output_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...] | str]:
    """Every module's per-sample output shape from a dry pass on zeros (for `kdpipe taps`); a module whose
    output is not one tensor shows its type name, one that never ran shows 'not run'."""
    paths = module_paths(model)
    with _dry_run(model), _capture(model, paths, "") as captured:
        model(_zeros(model, input_shape))
    return {p: tuple(captured[p].shape[1:]) if isinstance(captured.get(p), torch.Tensor)
            else type(captured[p]).__name__ if p in captured else "not run" for p in paths}


@dataclass(frozen=True)
class TapPair:
    """A student layer matched to a teacher layer, with their per-sample output shapes."""

    student: str
    teacher: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]

    def describe(self) -> str:
        return f"student '{self.student}' {_shape(self.student_shape)} and teacher '{self.teacher}' {_shape(self.teacher_shape)}"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _defaults(model: nn.Module, role: str) -> list[str]:
    taps = getattr(model, "default_taps", None)
    if not taps:
        raise InputError(f"distill.taps.{role}", f"the {role} model declares no default_taps: name its layers here "
                         f"(`kdpipe taps FILE` lists them); available: {', '.join(module_paths(model))}")
    return list(taps)


def by_relative_depth(positions: list[int], count: int, of: int) -> list[int]:
    """Map positions among `count` layers to positions among `of` layers at the same relative depth
    (the last maps to the last)."""
    return [max(0, math.ceil((i + 1) * of / count) - 1) for i in positions]


def pair_taps(student: nn.Module, teacher: nn.Module, taps, input_shape: tuple[int, ...],
              pick: Callable[[int], list[int]]) -> list[TapPair]:
    """Student/teacher layer pairs with their shapes, from `distill.taps` (TapsConfig or None) or the defaults.

    Default: the student's default_taps at the positions `pick(len(default_taps))` returns, each paired with
    the teacher's default tap at the same relative depth. Explicit lists pair by position; with one side
    given, the other side takes the last as many of its default taps.
    """
    student_paths = taps.student if taps is not None else None
    teacher_paths = taps.teacher if taps is not None else None
    if student_paths is None and teacher_paths is None:
        student_defaults, teacher_defaults = _defaults(student, "student"), _defaults(teacher, "teacher")
        positions = pick(len(student_defaults))
        student_paths = [student_defaults[i] for i in positions]
        teacher_paths = [teacher_defaults[i] for i in by_relative_depth(positions, len(student_defaults), len(teacher_defaults))]
    elif student_paths is None or teacher_paths is None:
        role, given = ("student", teacher_paths) if student_paths is None else ("teacher", student_paths)
        defaults = _defaults(student if role == "student" else teacher, role)
        if len(defaults) < len(given):
            raise InputError(f"distill.taps.{role}", f"{len(given)} taps are needed to pair with the other model's, but the "
                             f"{role} has {len(defaults)} default taps; name its layers here")
        chosen = defaults[len(defaults) - len(given):]
        student_paths, teacher_paths = (chosen, teacher_paths) if role == "student" else (student_paths, chosen)
    if not student_paths:
        raise InputError("distill.taps", "no layers to compare: name at least one student and one teacher layer")
    if len(student_paths) != len(teacher_paths):
        raise InputError("distill.taps", f"the student lists {len(student_paths)} taps and the teacher {len(teacher_paths)}; "
                         "taps pair by position, so give as many of each")
    with _dry_run(student):
        student_feats = forward_with_taps(student, _zeros(student, input_shape), student_paths, "distill.taps.student").features
    with _dry_run(teacher):
        teacher_feats = forward_with_taps(teacher, _zeros(teacher, input_shape), teacher_paths, "distill.taps.teacher").features
    return [TapPair(s, t, tuple(student_feats[s].shape[1:]), tuple(teacher_feats[t].shape[1:]))
            for s, t in zip(student_paths, teacher_paths)]
