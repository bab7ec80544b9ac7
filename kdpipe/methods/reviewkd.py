"""`reviewkd`: Chen et al. 2021, knowledge review: the student's stage ends, fused deep → shallow by attention
(ABF), learn the teacher's pre-ReLU stage ends through the hierarchical context loss (hcl_loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import InputError
from kdpipe.losses import hcl_loss
from kdpipe.methods import FeatureMethod, Params, method, param
from kdpipe.methods.rkd import RelationMethod
from kdpipe.taps import TapPair, declared_preact_taps, declared_taps, pair_from_deepest, tap_shapes
from kdpipe.train import full_precision


class ReviewKDParams(Params):
    weight: float = param(5.0, gt=0.0, low=0.5, high=10.0, log=True,
                          description="multiplies hcl_loss (after the warm-up factor), added to CE")
    warmup_epochs: int = param(20, ge=0, choices=[0, 5, 20],
                               description="the hcl weight grows as min(epoch / warmup_epochs, 1), epochs from 1; "
                                           "0: no warm-up")
    max_mid_channels: int = param(512, ge=1, choices=[128, 256, 512],
                                  description="ABF width: min(this, channels of the student's deepest level)")


class ABF(nn.Module):
    """Attention-based fusion of one level: the student map (conv1×1 + BN to `mid` channels), fused with the
    residual from the next deeper level by two per-pixel attention maps, resized to the teacher's H×W, then
    conv3×3 + BN to the teacher's channels. The deepest level has no residual (`fuse` False)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None)
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The level's output (teacher-shaped) and the fused map passed on to the next shallower level."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


def as_map(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A tap's shape as C×H×W: a vector (the embedding) is a 1×1 map."""
    return (shape[0], 1, 1) if len(shape) == 1 else shape


def as_map_tensor(feat: torch.Tensor) -> torch.Tensor:
    return feat.reshape(*feat.shape[:2], 1, 1) if feat.dim() == 2 else feat


@method("reviewkd")
class ReviewKD(FeatureMethod):
    family = "feature"
    paper = "Chen et al., Distilling Knowledge via Knowledge Review"
    year = 2021
    summary = ("knowledge review: CE + weight·min(epoch / warmup_epochs, 1)·hcl_loss between the student's stage ends "
               "and embedding, fused deep → shallow by attention-based fusion modules (dropped at export), and the "
               "teacher's pre-ReLU stage ends and embedding, aligned from the deepest")
    Params = ReviewKDParams

    @classmethod
    def tap_pairs(cls, params, student: nn.Module, teacher: nn.Module, taps, input_shape) -> list[TapPair]:
        """(student, teacher) taps shallow → deep: by default the student's stage ends and the teacher's pre-ReLU
        stage ends, each followed by its embedding."""
        def with_embedding(model, role, stage_ends):
            return stage_ends + [RelationMethod.default_tap(model, role)]  # the embedding_tap, or an InputError

        student_paths, teacher_paths = pair_from_deepest(
            taps, lambda: with_embedding(student, "student", declared_taps(student, "student")),
            lambda: with_embedding(teacher, "teacher", declared_preact_taps(teacher, "teacher", cls.name)))
        s_shapes = tap_shapes(student, list(dict.fromkeys(student_paths)), tuple(input_shape), "distill.taps.student")
        t_shapes = tap_shapes(teacher, list(dict.fromkeys(teacher_paths)), tuple(input_shape), "distill.taps.teacher")
        pairs = [TapPair(s, t, s_shapes[s], t_shapes[t]) for s, t in zip(student_paths, teacher_paths)]
        for pair in pairs:
            if len(pair.student_shape) not in (1, 3) or len(pair.teacher_shape) not in (1, 3):
                raise InputError("distill.taps", f"reviewkd fuses feature maps K×H×W or vectors K, but got "
                                 f"{pair.describe()}")
        return pairs

    def __init__(self, params: ReviewKDParams, **kwargs):
        super().__init__(params, **kwargs)
        mid = min(params.max_mid_channels, as_map(self.pairs[-1].student_shape)[0])
        deepest = len(self.pairs) - 1
        self.abfs = nn.ModuleList(ABF(as_map(pair.student_shape)[0], mid, as_map(pair.teacher_shape)[0],
                                      fuse=i < deepest) for i, pair in enumerate(self.pairs))
        first = next(self.student.parameters(), None)
        if first is not None:
            self.abfs.to(first.device)

    def extra_modules(self):
        return self.abfs

    def review(self, student_features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs, shallow → deep, computed along the review path deep → shallow."""
        outputs, residual = [], None
        for pair, abf in reversed(list(zip(self.pairs, self.abfs))):
            out, residual = abf(as_map_tensor(student_features[pair.student]), residual,
                                as_map(pair.teacher_shape)[1:])
            outputs.insert(0, out)
        return outputs

    def warmup_factor(self) -> float:
        """min(epoch / warmup_epochs, 1) with epochs from 1 (mdistiller's count: the first epoch weighs
        1 / warmup_epochs; the dvlab code counts from 0, its first epoch weighs 0)."""
        warmup = self.params.warmup_epochs
        return min(self.epoch / warmup, 1.0) if warmup > 0 else 1.0

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        reviewed = self.review(student.features)
        targets = [as_map_tensor(teacher.features[pair.teacher]) for pair in self.pairs]
        with full_precision(ce.device):  # hcl in fp32 (METHODS.md)
            hcl = hcl_loss([r.float() for r in reviewed], [t.float() for t in targets])
        return ce + self.params.weight * self.warmup_factor() * hcl, {"ce": ce.detach(), "hcl": hcl.detach()}
