"""`kd`: Hinton et al. 2015, logit distillation at temperature T, with the logit standardization switch."""

from typing import Literal

import torch.nn.functional as F

from kdpipe.errors import InputError
from kdpipe.losses import kd_loss
from kdpipe.methods import Method, method, param
from kdpipe.methods.standardize import LogitStandParams, distilled_logits

SEPARATE_WEIGHTS = ("ce_weight", "kd_weight")


class KDParams(LogitStandParams):
    temperature: float = param(4.0, gt=0.0, low=1.0, high=20.0, log=True, when={"logit_stand": [False]},
                               description="T of both softmaxes (logit_stand: base_temperature replaces it)")
    weights: Literal["alpha", "separate"] = param(
        "alpha", choices=["alpha", "separate"],
        description="alpha: (1 − alpha)·CE + alpha·KD; separate: ce_weight·CE + kd_weight·KD (LS's CE 0.1 + KD 9)")
    alpha: float = param(0.9, ge=0.0, le=1.0, low=0.0, high=1.0, when={"weights": ["alpha"]},
                         description="multiplies the KD term (as RepDistiller's -a); CE gets 1 − alpha")
    ce_weight: float = param(0.1, ge=0.0, low=0.05, high=1.0, log=True, when={"weights": ["separate"]},
                             description="weights: separate: multiplies the CE term")
    kd_weight: float = param(9.0, ge=0.0, low=1.0, high=20.0, log=True, when={"weights": ["separate"]},
                             description="weights: separate: multiplies the KD term")


@method("kd")
class HintonKD(Method):
    family = "logit"
    paper = "Hinton, Vinyals and Dean, Distilling the Knowledge in a Neural Network"
    year = 2015
    summary = ("Hinton KD: (1 − alpha)·CE + alpha·kd_loss (T²·KL(p_t^T ‖ p_s^T)), or ce_weight·CE + kd_weight·kd_loss "
               "(weights: separate); logit_stand: KD on standardized logits at base_temperature")
    Params = KDParams
    # kd_loss reads the teacher through softmax(z / T) alone (not under logit_stand: reads_teacher_soft_labels)
    teacher_soft_labels = True

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        """A weight of the mode not chosen is refused. Judged by value, not by presence: a run's record repeats every
        default, and `--resume` checks it again."""
        super().check_pipeline(pipeline)
        params = pipeline.distill.params
        defaults = KDParams()
        if params.weights == "separate" and params.alpha != defaults.alpha:
            raise InputError("distill.params.alpha", "weights: separate weighs CE and KD by ce_weight and kd_weight; "
                             "give alpha (with weights: alpha) or ce_weight and kd_weight, not both")
        changed = [k for k in SEPARATE_WEIGHTS if getattr(params, k) != getattr(defaults, k)]
        if params.weights == "alpha" and changed:
            raise InputError(f"distill.params.{changed[0]}", "acts only with weights: separate (which replaces "
                             "alpha); set weights: separate, or give alpha alone")

    def loss(self, batch, student, teacher):
        params = self.params
        ce = F.cross_entropy(student.logits, batch.y)
        # Under logit_stand, distilled_logits standardizes in fp32; otherwise kd is computed as it always was.
        s, t, temperature = distilled_logits(params, student.logits, teacher.logits, params.temperature)
        kd = kd_loss(s, t, temperature=temperature)
        ce_weight, kd_weight = ((1.0 - params.alpha, params.alpha) if params.weights == "alpha"
                                else (params.ce_weight, params.kd_weight))
        return ce_weight * ce + kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach()}
