"""`ofd`: Heo et al. 2019, overhaul of feature distillation: the student's pre-ReLU stage ends, through a
connector, learn the teacher's with a partial L2 that ignores what the teacher's ReLU would discard (ofd_loss)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import InputError
from kdpipe.losses import ofd_loss, ofd_margin
from kdpipe.methods import FeatureMethod, Params, method, param
from kdpipe.taps import TapPair, declared_preact_taps, pair_from_deepest, tap_shapes
from kdpipe.train import full_precision


class OFDParams(Params):
    weight: float = param(1e-3, gt=0.0, low=1e-4, high=1e-2, log=True,
                          description="multiplies the layer-weighted sum of ofd_loss, added to CE (ImageNet: 1e-4)")


def make_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """conv1×1 (no bias, He-normal over fan-out) + BN(γ 1, β 0): the student's map in the teacher's channels."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))  # fan-out of a 1×1 conv: out channels
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


def teacher_bns(teacher: nn.Module, paths: list[str]) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm before the ReLU of each tapped teacher layer: the model's declaration (preact_bns) for its
    preact_taps, or the tapped module itself when it is a BatchNorm."""
    declared = dict(zip(getattr(teacher, "preact_taps", None) or [], getattr(teacher, "preact_bns", None) or []))
    modules = dict(teacher.named_modules())
    bns = []
    for path in paths:
        bn = modules.get(declared.get(path, path))
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
            raise InputError("distill.taps.teacher", f"ofd takes its margins from the BatchNorm before the teacher's "
                             f"tapped ReLU, but '{path}' is neither an affine BatchNorm nor a pre-ReLU tap the teacher "
                             "declares one for (preact_bns); name BatchNorm layers here")
        bns.append(bn)
    return bns


@method("ofd")
class OFD(FeatureMethod):
    family = "feature"
    paper = "Heo et al., A Comprehensive Overhaul of Feature Distillation"
    year = 2019
    summary = ("overhaul of feature distillation: CE + weight·Σ_i 2^−(L−i)·ofd_loss between connector(student) and "
               "the teacher's pre-ReLU stage ends (aligned from the deepest), margins from the teacher's BN before "
               "each ReLU; connectors dropped at export. Deviation: the teacher runs in eval mode (the references "
               "use its batch statistics in train mode; effect unconfirmed)")
    Params = OFDParams

    @classmethod
    def tap_pairs(cls, params, student: nn.Module, teacher: nn.Module, taps, input_shape) -> list[TapPair]:
        """Pre-ReLU stage ends of both nets (or `distill.taps`), aligned from the deepest, shallow → deep."""
        student_paths, teacher_paths = pair_from_deepest(
            taps, lambda: declared_preact_taps(student, "student", cls.name),
            lambda: declared_preact_taps(teacher, "teacher", cls.name))
        teacher_bns(teacher, teacher_paths)
        s_shapes = tap_shapes(student, list(dict.fromkeys(student_paths)), tuple(input_shape), "distill.taps.student")
        t_shapes = tap_shapes(teacher, list(dict.fromkeys(teacher_paths)), tuple(input_shape), "distill.taps.teacher")
        pairs = [TapPair(s, t, s_shapes[s], t_shapes[t]) for s, t in zip(student_paths, teacher_paths)]
        for pair in pairs:
            s, t = pair.student_shape, pair.teacher_shape
            if len(s) != 3 or len(t) != 3:
                raise InputError("distill.taps", f"ofd compares feature maps K×H×W, but got {pair.describe()}")
            if t[1] < s[1] or t[2] < s[2]:
                raise InputError("distill.taps", f"ofd pools the teacher's map to the student's H×W, but the teacher's "
                                 f"is smaller: {pair.describe()}; name layers of matching resolution here")
        return pairs

    def __init__(self, params: OFDParams, **kwargs):
        super().__init__(params, **kwargs)
        self.connectors = nn.ModuleList(make_connector(p.student_shape[0], p.teacher_shape[0]) for p in self.pairs)
        first = next(self.student.parameters(), None)
        if first is not None:
            self.connectors.to(first.device)
        # The teacher is frozen, so its margins are constants (not state: they follow from the teacher's weights).
        for i, bn in enumerate(teacher_bns(self.teacher, [p.teacher for p in self.pairs])):
            self.register_buffer(f"margin{i}", ofd_margin(bn), persistent=False)

    def extra_modules(self):
        return self.connectors

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.pairs))]

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        count = len(self.pairs)
        connected = [connector(student.features[pair.student]) for connector, pair in zip(self.connectors, self.pairs)]
        with full_precision(ce.device):  # fp32 under autocast (METHODS.md)
            distill = sum(ofd_loss(feat.float(), teacher.features[pair.teacher].float(), margin) / 2 ** (count - 1 - i)
                          for i, (feat, pair, margin) in enumerate(zip(connected, self.pairs, self.margins())))
        return ce + self.params.weight * distill, {"ce": ce.detach(), "ofd": distill.detach()}
