"""Teacher views (FKD: Shen & Xing, ECCV 2022): augmented distillation at about the cost of the student alone.

With augmented training inputs the teacher's outputs change every step, so the teacher-output cache does not
apply and an online teacher runs at every step. Instead, each training image gets `views` augmented views,
drawn once: each view's augmentation parameters are recorded (kornia's own, kdpipe.data.augment), the teacher
scores each view once, and its soft label is kept as the k most probable classes' log-probabilities (at
temperature 1, fp16) with the remaining probability mass spread evenly over the other classes. Every epoch the
student gets one recorded view per image, re-made from its parameters: exactly the input the teacher scored.

Why log-probabilities: the KD loss needs the teacher's distribution at the loss's temperature T. From the
stored target p̂ (the top k as scored, every other class (1 − Σ_top p)/(C − k)) it takes p̂^T ∝ p̂^(1/T),
that is, log p̂ in place of the teacher's logits. With k = C, log p̂ = z − logsumexp(z) and softmax is
shift-invariant, so the loss equals the online teacher's (up to the fp16 rounding of the stored values).
Stored probabilities would not do: fp16 flushes p < 6e-8 to 0, where p^(1/4) is still 0.016.

Entries are keyed by content (the teacher's weights, the data's fingerprint, the augmentation, kornia's
version, views, k, the seed, the autocast dtype), held in memory on the training device and written to the
cache directory (verified, kdpipe.cache_store) when one is set; an entry larger than the memory budget stays
on disk, memory-mapped. They live in the runner's one TeacherOutputCache, under its memory budget with the
teacher outputs, so every trial of a search campaign replays the same views.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.cache_store import lookup, store, warn_stderr
from kdpipe.data.augment import AugmentParams
from kdpipe.fingerprint import fingerprint
from kdpipe.teacher_cache import TeacherOutputCache, full_pass, teacher_pass

# The log-probability of a class the teacher leaves no mass (below float32's range): finite, so that the KL
# term 0·(log 0 − log q) stays 0 instead of 0·∞ = nan, and representable in fp16.
LOG_FLOOR = -1.0e4


@dataclass
class TeacherViews:
    """The recorded views of a training split and the teacher's soft label of each; row = image · views + view."""

    views: int
    num_classes: int
    params: AugmentParams  # per row, the augmentation that makes the view from its image
    top_logprob: torch.Tensor  # rows × k, fp16: the k largest log-probabilities, in descending order
    top_class: torch.Tensor  # rows × k: their classes
    rest_logprob: torch.Tensor  # rows, fp16: the log-probability of each of the other C − k classes
    device: torch.device  # where targets go (the stored tensors may be memory-mapped on the CPU)

    @property
    def topk(self) -> int:
        return self.top_logprob.shape[1]

    def log_probabilities(self, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """log p̂ (N × C, float32) of views `view` of training images `index`: the targets' log-probabilities."""
        rows = (index * self.views + view).to(self.top_logprob.device)
        top = self.top_logprob[rows].to(self.device, torch.float32)
        log_p = self.rest_logprob[rows].to(self.device, torch.float32).unsqueeze(1).repeat(1, self.num_classes)
        return log_p.scatter_(1, self.top_class[rows].to(self.device, torch.int64), top)

    def state(self) -> dict:
        return {"views": self.views, "num_classes": self.num_classes, "per_sample": self.params.per_sample,
                "shared": self.params.shared, "top_logprob": self.top_logprob, "top_class": self.top_class,
                "rest_logprob": self.rest_logprob}

    @classmethod
    def from_state(cls, state: dict, device: torch.device, resident: bool) -> TeacherViews:
        """From a state loaded memory-mapped: copied to `device` when `resident`, else left mapped (each batch then
        reads its rows from the file)."""
        move = (lambda t: t.to(device, copy=True)) if resident else (lambda t: t)
        params = AugmentParams([{k: move(v) for k, v in step.items()} for step in state["per_sample"]], state["shared"])
        stored = (move(state[k]) for k in ("top_logprob", "top_class", "rest_logprob"))
        return cls(state["views"], state["num_classes"], params, *stored, device)


def _nbytes(state: dict) -> int:
    tensors = [state["top_logprob"], state["top_class"], state["rest_logprob"],
               *(v for step in state["per_sample"] for v in step.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


def _class_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def views_nbytes(data, views: int, topk: int) -> int:
    """What `_nbytes` will count for the views of `data`'s training split, before any is made: the parameters of
    one drawn view, and per view the top-k fp16 log-probabilities, their classes and the fp16 rest."""
    topk = min(topk, data.num_classes)
    drawn = data.augmentation.draw(1, torch.Generator().manual_seed(0))
    params = sum(v.numel() * v.element_size() for step in drawn.per_sample for v in step.values())
    labels = topk * (2 + _class_dtype(data.num_classes).itemsize) + 2
    return len(data.y_train) * views * (params + labels)


def key(teacher: nn.Module, data, views: int, topk: int, seed: int, autocast: torch.dtype | None) -> str:
    return fingerprint(teacher, data.fingerprint, data.augmentation.settings, kornia.__version__, views, topk, seed,
                       str(autocast))


def teacher_views(cache: TeacherOutputCache, teacher: nn.Module, data, *, views: int, topk: int, seed: int,
                  autocast: torch.dtype | None = None, channels_last: bool = False) -> TeacherViews:
    """The views of `data`'s (augmented) training split and `teacher`'s soft labels on them: from `cache` (memory,
    then its directory), or computed in one teacher pass over every view and stored there. `topk` is clipped to
    the class count."""
    topk = min(topk, data.num_classes)
    entry = f"views-{key(teacher, data, views, topk, seed, autocast)}"
    cache.last_pass = None
    if (held := cache.recall(entry)) is not None:
        return held
    device = data.y_train.device
    path = cache.directory / f"{entry}.pt" if cache.directory is not None else None
    if path is not None and lookup(path, warn_stderr):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        result = TeacherViews.from_state(state, device, cache.fits(_nbytes(state)))
    else:
        result = _compute(cache, teacher, data, views, topk, seed, autocast, channels_last)
        cache.view_passes += 1
        if path is not None:
            state = {k: _cpu(v) for k, v in result.state().items()}
            store(path, lambda tmp: torch.save(state, tmp))
            if not cache.fits(_nbytes(state)):
                result = TeacherViews.from_state(torch.load(path, map_location="cpu", weights_only=True, mmap=True),
                                                 device, resident=False)
    # In memory unless it was left memory-mapped from `path` (beyond the budget); without a directory it stays.
    size = _nbytes(result.state())
    cache.hold(entry, result, size if path is None or cache.fits(size) else 0)
    return result


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [{k: v.cpu() for k, v in step.items()} for step in value]
    return value


def _compute(cache: TeacherOutputCache, teacher: nn.Module, data, views: int, topk: int, seed: int,
             autocast: torch.dtype | None, channels_last: bool) -> TeacherViews:
    """Draw every view's parameters at once, then score the views in row order, at the teacher pass's batch
    (kdpipe.teacher_cache.full_pass: measured on CPU, the largest that fits on CUDA); `cache.last_pass` says how."""
    device = data.y_train.device
    num_classes = data.num_classes
    params = data.augmentation.draw(len(data.y_train) * views, torch.Generator().manual_seed(seed)).to(device)
    class_dtype = _class_dtype(num_classes)

    def forward(sizes: int | Iterable[int]) -> TeacherViews:
        tops, classes, rests = [], [], []
        for _, x in data.view_inputs(params, views, sizes):
            log_p = F.log_softmax(teacher_pass(teacher, x, [], autocast, channels_last).logits, dim=1)
            top, top_class = log_p.topk(topk, dim=1)
            if topk < num_classes:  # the other classes' mass, spread evenly: logsumexp of theirs − log(C − k)
                rest = torch.logsumexp(log_p.scatter(1, top_class, -math.inf), dim=1) - math.log(num_classes - topk)
            else:
                rest = torch.full((len(x),), LOG_FLOOR, device=device)
            tops.append(top.clamp_min(LOG_FLOOR).half())
            classes.append(top_class.to(class_dtype))
            rests.append(rest.clamp_min(LOG_FLOOR).half())
        return TeacherViews(views, num_classes, params, torch.cat(tops), torch.cat(classes), torch.cat(rests), device)

    result, cache.last_pass = full_pass(len(data.y_train) * views, device, forward, data.stream is not None)
    return result

