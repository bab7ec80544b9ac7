"""`dkd`: Decoupled KD (Zhao et al. 2022): the KD term split into target-class and non-target-class parts."""

import torch.nn.functional as F

from kdpipe.losses import dkd_loss
from kdpipe.methods import Method, method, param
from kdpipe.methods.standardize import LogitStandParams, distilled_logits
from kdpipe.train import full_precision


class DKDParams(LogitStandParams):
    alpha: float = param(1.0, ge=0.0, low=0.5, high=2.0, description="multiplies TCKD (target vs non-target split)")
    beta: float = param(8.0, ge=0.0, low=0.5, high=10.0,
                        description="multiplies NCKD (among the non-target classes); CIFAR: 8, 6 or 2 by pair")
    temperature: float = param(4.0, gt=0.0, low=1.0, high=8.0, when={"logit_stand": [False]},
                               description="T of every softmax of dkd_loss (logit_stand: base_temperature replaces it)")
    warmup: int = param(20, ge=1, low=1, high=40,
                        description="epochs over which the DKD weight rises linearly: min(epoch/warmup, 1)")
    ce_weight: float = param(1.0, ge=0.0, low=0.1, high=2.0, description="multiplies the CE term")


def warmup_factor(epoch: int, warmup: int) -> float:
    """min(epoch/warmup, 1), epochs from 1 (mdistiller): epoch 1 of a 20-epoch warm-up weighs 1/20."""
    return min(epoch / warmup, 1.0)


@method("dkd")
class DKD(Method):
    family = "logit"
    paper = "Zhao et al., Decoupled Knowledge Distillation"
    year = 2022
    summary = ("Decoupled KD: ce_weight·CE + min(epoch/warmup, 1)·(alpha·TCKD + beta·NCKD) at T; "
               "logit_stand: on standardized logits at base_temperature")
    Params = DKDParams
    # reads the teacher through softmax(z / T) alone: teacher views on augmented data (not under logit_stand)
    teacher_soft_labels = True

    def loss(self, batch, student, teacher):
        params = self.params
        ce = F.cross_entropy(student.logits, batch.y)
        with full_precision(ce.device):
            s, t, temperature = distilled_logits(params, student.logits.float(), teacher.logits.float(),
                                                 params.temperature)
            dkd = dkd_loss(s, t, batch.y, alpha=params.alpha, beta=params.beta, temperature=temperature)
        total = params.ce_weight * ce + warmup_factor(self.epoch, params.warmup) * dkd
        return total, {"ce": ce.detach(), "dkd": dkd.detach()}
