"""`at`: Zagoruyko & Komodakis 2017, attention transfer between paired feature maps."""

import torch.nn.functional as F

from kdpipe.errors import InputError
from kdpipe.losses import at_loss, kd_loss
from kdpipe.methods import FeatureMethod, Params, method, param
from kdpipe.taps import pair_at_equal_resolution
from kdpipe.train import full_precision


class ATParams(Params):
    weight: float = param(1000.0, gt=0.0, low=100.0, high=10000.0, log=True,
                          description="β: the sum of at_loss over the layer pairs is multiplied by β/2 (the paper's eq. 2)")
    p: float = param(2.0, gt=0.0, low=1.0, high=4.0, description="exponent of the attention map mean_c |F|^p")
    kd_weight: float = param(0.0, ge=0.0, low=0.0, high=1.0, description="multiplies the optional Hinton term kd_loss")
    temperature: float = param(4.0, gt=0.0, low=1.0, high=20.0, log=True, description="T of the optional Hinton term")


def check_poolable(pair, name: str) -> None:
    """at/nst pool the larger feature map to the smaller H×W: both must be maps, one no smaller on both sides."""
    s, t = pair.student_shape, pair.teacher_shape
    if len(s) != 3 or len(t) != 3:
        raise InputError("distill.taps", f"{name} compares feature maps K×H×W, but got {pair.describe()}")
    if not ((s[1] >= t[1] and s[2] >= t[2]) or (s[1] <= t[1] and s[2] <= t[2])):
        raise InputError("distill.taps", f"{name} cannot pool {pair.describe()} to one H×W")


def with_optional_kd(method, total, parts, student, teacher):
    """Add the optional Hinton term kd_weight·kd_loss that at and nst offer."""
    params = method.params
    if params.kd_weight > 0:
        kd = kd_loss(student.logits, teacher.logits, temperature=params.temperature)
        total = total + params.kd_weight * kd
        parts["kd"] = kd.detach()
    return total, parts


@method("at")
class AttentionTransfer(FeatureMethod):
    family = "feature"
    paper = "Zagoruyko and Komodakis, Paying More Attention to Attention"
    year = 2017
    summary = ("attention transfer: CE + (weight/2)·Σ at_loss over stage-end pairs of equal resolution "
               "(+ kd_weight·kd_loss); weight is the paper's β")
    Params = ATParams
    default_pairs = staticmethod(pair_at_equal_resolution)

    @classmethod
    def check_pair(cls, pair, params):
        check_poolable(pair, "at")

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        with full_precision(ce.device):
            at = sum(at_loss(student.features[pair.student].float(), teacher.features[pair.teacher].float(),
                             p=self.params.p) for pair in self.pairs)
        return with_optional_kd(self, ce + self.params.weight / 2 * at, {"ce": ce.detach(), "at": at.detach()},
                                student, teacher)
