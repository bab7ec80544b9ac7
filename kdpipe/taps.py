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


def declared_taps(model: nn.Module, role: str) -> list[str]:
    taps = getattr(model, "default_taps", None)
    if not taps:
        raise InputError(f"distill.taps.{role}", f"the {role} model declares no default_taps: name its layers here "
                         f"(`kdpipe taps FILE` lists them); available: {', '.join(module_paths(model))}")
    return list(taps)


def declared_preact_taps(model: nn.Module, role: str, method: str) -> list[str]:
    """The model's stage ends before their last ReLU (`preact_taps`), declared by the zoo models (with, in
    `preact_bns`, the BatchNorm each of those ReLUs reads: kdpipe.models.cifar); other models must name layers."""
    taps = getattr(model, "preact_taps", None)
    if not taps:
        raise InputError(f"distill.taps.{role}", f"method '{method}' taps the {role}'s stage ends before their ReLU, "
                         f"but the {role} model declares none (preact_taps): name its layers here (`kdpipe taps FILE` "
                         f"lists them); available: {', '.join(module_paths(model))}")
    return list(taps)


def by_relative_depth(positions: list[int], count: int, of: int) -> list[int]:
    """Map positions among `count` layers to positions among `of` layers at the same relative depth
    (the last maps to the last)."""
    return [max(0, math.ceil((i + 1) * of / count) - 1) for i in positions]


Shaped = list[tuple[str, tuple[int, ...]]]  # default taps (stage ends, shallow to deep) with their output shapes
Pairing = Callable[[Shaped, Shaped], list[tuple[int, int]]]


def pair_at_equal_resolution(student: Shaped, teacher: Shaped) -> list[tuple[int, int]]:
    """Every student stage end with the teacher's deepest stage end of the same H×W (the end of the teacher's
    stage at that resolution); where the teacher has none, the one at the same relative depth (pooled)."""
    pairs = []
    for i, (_, shape) in enumerate(student):
        same = [j for j, (_, t_shape) in enumerate(teacher) if len(shape) == 3 and t_shape[1:] == shape[1:]]
        pairs.append((i, same[-1] if same else by_relative_depth([i], len(student), len(teacher))[0]))
    return pairs


def pair_middle(student: Shaped, teacher: Shaped) -> list[tuple[int, int]]:
    """The end of the student's middle stage with the end of the teacher's middle stage (FitNets)."""
    return [((len(student) - 1) // 2, (len(teacher) - 1) // 2)]


def pair_last(student: Shaped, teacher: Shaped) -> list[tuple[int, int]]:
    """The last stage ends: the last convolutional activation maps (similarity-preserving KD)."""
    return [(len(student) - 1, len(teacher) - 1)]


def pair_from_deepest(taps, student_defaults: Callable[[], list[str]],
                      teacher_defaults: Callable[[], list[str]]) -> tuple[list[str], list[str]]:
    """Student and teacher paths (shallow → deep) aligned from the deepest (ReviewKD, OFD): `distill.taps` (TapsConfig
    or None) where given, else each side's defaults (asked only for a side not given); explicit lists pair by
    position, a side taken from defaults keeps its deepest as many as the other side has."""
    given_student, given_teacher = (taps.student, taps.teacher) if taps is not None else (None, None)
    student = list(given_student) if given_student is not None else student_defaults()
    teacher = list(given_teacher) if given_teacher is not None else teacher_defaults()
    for role, given, own, other in (("student", given_student, student, teacher),
                                    ("teacher", given_teacher, teacher, student)):
        if given is not None and len(own) > len(other):
            raise InputError(f"distill.taps.{role}", f"{len(own)} {role} taps, but the other model offers "
                             f"{len(other)}; taps pair by position, so give as many of each")
    if not student or not teacher:
        raise InputError("distill.taps", "no layers to compare: name at least one student and one teacher layer")
    count = min(len(student), len(teacher))
    return student[len(student) - count:], teacher[len(teacher) - count:]


def tap_shapes(model: nn.Module, paths: list[str], input_shape: tuple[int, ...], key: str) -> dict[str, tuple[int, ...]]:
    with _dry_run(model):
        features = forward_with_taps(model, _zeros(model, input_shape), paths, key).features
    return {p: tuple(f.shape[1:]) for p, f in features.items()}


def pair_taps(student: nn.Module, teacher: nn.Module, taps, input_shape: tuple[int, ...], pairing: Pairing) -> list[TapPair]:
    """Student/teacher layer pairs with their shapes, from `distill.taps` (TapsConfig or None) or the defaults.

    Default: `pairing` picks pairs among the models' default taps (the ends of their stages). Explicit lists
    pair by position; with one side given, the other side takes the last as many of its default taps.
    """
    student_paths = taps.student if taps is not None else None
    teacher_paths = taps.teacher if taps is not None else None
    if student_paths is None and teacher_paths is None:
        student_defaults, teacher_defaults = declared_taps(student, "student"), declared_taps(teacher, "teacher")
        s_shapes = tap_shapes(student, student_defaults, input_shape, "distill.taps.student")
        t_shapes = tap_shapes(teacher, teacher_defaults, input_shape, "distill.taps.teacher")
        chosen = pairing([(p, s_shapes[p]) for p in student_defaults], [(p, t_shapes[p]) for p in teacher_defaults])
        student_paths = [student_defaults[i] for i, _ in chosen]
        teacher_paths = [teacher_defaults[j] for _, j in chosen]
    elif student_paths is None or teacher_paths is None:
        role, given = ("student", teacher_paths) if student_paths is None else ("teacher", student_paths)
        defaults = declared_taps(student if role == "student" else teacher, role)
        if len(defaults) < len(given):
            raise InputError(f"distill.taps.{role}", f"{len(given)} taps are needed to pair with the other model's, but the "
                             f"{role} has {len(defaults)} default taps; name its layers here")
        chosen_paths = defaults[len(defaults) - len(given):]
        student_paths, teacher_paths = (chosen_paths, teacher_paths) if role == "student" else (student_paths, chosen_paths)
    if not student_paths:
        raise InputError("distill.taps", "no layers to compare: name at least one student and one teacher layer")
    if len(student_paths) != len(teacher_paths):
        raise InputError("distill.taps", f"the student lists {len(student_paths)} taps and the teacher {len(teacher_paths)}; "
                         "taps pair by position, so give as many of each")
    student_shapes = tap_shapes(student, list(dict.fromkeys(student_paths)), input_shape, "distill.taps.student")
    teacher_shapes = tap_shapes(teacher, list(dict.fromkeys(teacher_paths)), input_shape, "distill.taps.teacher")
    return [TapPair(s, t, student_shapes[s], teacher_shapes[t]) for s, t in zip(student_paths, teacher_paths)]
