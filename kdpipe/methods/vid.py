"""`vid`: Variational Information Distillation (Ahn et al. 2019): at pairs of stage ends, a regressor predicts the
mean of a Gaussian over the teacher's map from the student's, with a trained variance per teacher channel; the
student maximizes the likelihood of the teacher's map.

Default pairs: stage ends at equal index from the first (RepDistiller's feat[1:-1], the 3 stage ends of CIFAR
ResNets); with fewer stages on one side the other's deepest go unpaired (digits cnn: student depth 2, teacher
depth 3: blocks.0 with blocks.0 at 8×8, blocks.1 with blocks.1 at 4×4, the teacher's 2×2 blocks.2 unused).
The larger map is pooled to the smaller H×W. Regressors and variances are dropped at export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.losses import _pool_to_smaller, vid_loss
from kdpipe.methods import FeatureMethod, Params, method, param
from kdpipe.methods.at import check_poolable
from kdpipe.taps import TapPair
from kdpipe.train import full_precision

INITIAL_VARIANCE = 5.0
EPS = 1e-5  # σ²_c = softplus(α_c) + EPS


class VIDParams(Params):
    weight: float = param(1.0, gt=0.0, low=0.1, high=10.0, log=True,
                          description="multiplies the sum over layer pairs of vid_loss (added to CE)")


def pair_equal_index(student, teacher) -> list[tuple[int, int]]:
    """Stage end i of the student with stage end i of the teacher, for as many as both have."""
    return [(i, i) for i in range(min(len(student), len(teacher)))]


class VariationalRegressor(nn.Module):
    """μ: conv1×1 (C_s→C_t) → ReLU → conv1×1 → ReLU → conv1×1, no biases, mid channels C_t (RepDistiller); and α,
    one per teacher channel, initialized so that σ² starts at 5."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        c = teacher_channels
        self.mean = nn.Sequential(nn.Conv2d(student_channels, c, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(c, c, 1, bias=False), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False))
        # softplus(α) + EPS = 5  ⇔  α = log(e^(5 − EPS) − 1)
        self.log_scale = nn.Parameter(torch.full((c,), math.log(math.expm1(INITIAL_VARIANCE - EPS))))


@method("vid")
class VID(FeatureMethod):
    family = "feature"
    paper = "Ahn, Hu, Damianou, Lawrence and Dai, Variational Information Distillation for Knowledge Transfer"
    year = 2019
    summary = ("variational information distillation: CE + weight·Σ over stage-end pairs of the Gaussian NLL of "
               "the teacher's map given the student's (trained mean regressor, variance per channel)")
    Params = VIDParams
    default_pairs = staticmethod(pair_equal_index)

    @classmethod
    def check_pair(cls, pair: TapPair, params) -> None:
        check_poolable(pair, "vid")

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.regressors = nn.ModuleList(VariationalRegressor(pair.student_shape[0], pair.teacher_shape[0])
                                        for pair in self.pairs)
        first = next(self.student.parameters(), None)
        if first is not None:
            self.regressors.to(first.device)

    def extra_modules(self):
        return self.regressors

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        with full_precision(ce.device):
            vid = ce.new_zeros(())
            for regressor, pair in zip(self.regressors, self.pairs):
                s, t = _pool_to_smaller(student.features[pair.student].float(), teacher.features[pair.teacher].float(),
                                        "vid")
                vid = vid + vid_loss(regressor.mean(s), t, regressor.log_scale, eps=EPS)
        return ce + self.params.weight * vid, {"ce": ce.detach(), "vid": vid.detach()}
