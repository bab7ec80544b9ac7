"""`nst`: Huang & Wang 2017, neuron selectivity transfer (MMD between channel distributions)."""

from typing import Literal

import torch.nn.functional as F

from kdpipe.losses import KERNELS, nst_loss
from kdpipe.methods import FeatureMethod, Params, method, param
from kdpipe.methods.at import check_poolable, with_optional_kd
from kdpipe.taps import pair_at_equal_resolution
from kdpipe.train import full_precision


class NSTParams(Params):
    weight: float = param(50.0, gt=0.0, low=1.0, high=100.0, log=True,
                          description="multiplies the sum of nst_loss over the layer pairs (the paper's λ/2)")
    kernel: Literal["linear", "polynomial", "gaussian"] = param("polynomial", choices=list(KERNELS))
    degree: int = param(2, ge=1, choices=[1, 2, 3], when={"kernel": ["polynomial"]})
    c: float = param(0.0, ge=0.0, low=0.0, high=1.0, when={"kernel": ["polynomial"]})
    sigma2: float = param(1.0, gt=0.0, low=0.1, high=10.0, log=True, when={"kernel": ["gaussian"]})
    kd_weight: float = param(0.0, ge=0.0, low=0.0, high=1.0, description="multiplies the optional Hinton term kd_loss")
    temperature: float = param(4.0, gt=0.0, low=1.0, high=20.0, log=True, description="T of the optional Hinton term")


@method("nst")
class NeuronSelectivityTransfer(FeatureMethod):
    family = "feature"
    paper = "Huang and Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    year = 2017
    summary = "NST: CE + weight·Σ nst_loss (MMD², kernel linear|polynomial|gaussian) over tapped pairs (+ kd_weight·kd_loss)"
    Params = NSTParams
    default_pairs = staticmethod(pair_at_equal_resolution)

    @classmethod
    def check_pair(cls, pair, params):
        check_poolable(pair, "nst")

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        p = self.params
        with full_precision(ce.device):
            nst = sum(nst_loss(student.features[pair.student].float(), teacher.features[pair.teacher].float(),
                               kernel=p.kernel, degree=p.degree, c=p.c, sigma2=p.sigma2) for pair in self.pairs)
        return with_optional_kd(self, ce + p.weight * nst, {"ce": ce.detach(), "nst": nst.detach()}, student, teacher)
