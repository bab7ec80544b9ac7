"""`ctkd`: Curriculum Temperature KD (Li et al. 2023): a learned temperature trained adversarially to the student."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import InputError
from kdpipe.losses import dkd_loss, grad_reverse, kd_loss, standardize_logits
from kdpipe.methods import Method, method, param
from kdpipe.methods.standardize import LogitStandSwitch
from kdpipe.train import full_precision


class CTKDParams(LogitStandSwitch):
    loss: Literal["kd", "dkd"] = param("kd", choices=["kd", "dkd"], description="the loss τ replaces T in")
    ce_weight: float = param(0.1, ge=0.0, low=0.05, high=1.0, log=True, description="multiplies the CE term")
    kd_weight: float = param(0.9, ge=0.0, low=0.1, high=20.0, log=True,
                             description="multiplies the distillation term (LS's CTKD: 9)")
    t_min: float = param(1.0, gt=0.0, low=0.5, high=2.0,
                         description="the lowest temperature: τ ∈ (t_min, t_min + t_range)")
    t_range: float = param(20.0, gt=0.0, low=10.0, high=30.0, description="τ = t_min + t_range·sigmoid(θ)")
    lambda_min: float = param(0.0, ge=0.0, low=0.0, high=0.5, description="λ at epoch 0, where the curriculum starts")
    lambda_max: float = param(1.0, ge=0.0, low=0.5, high=2.0, description="λ from curriculum_epochs on")
    curriculum_epochs: int = param(10, ge=1, low=5, high=40,
                                   description="E: λ rises from lambda_min to lambda_max along a half cosine")
    alpha: float = param(1.0, ge=0.0, low=0.5, high=2.0, when={"loss": ["dkd"]}, description="loss: dkd: TCKD weight")
    beta: float = param(8.0, ge=0.0, low=0.5, high=10.0, when={"loss": ["dkd"]}, description="loss: dkd: NCKD weight")


class LearnedTemperature(nn.Module):
    """θ, one fp32 scalar: in the method's state_dict (checkpoints, resume), trained by the student's optimizer.
    No forward: the method computes τ from θ itself, so a compiled module never recompiles for each epoch's λ."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.ones((), dtype=torch.float32))


def curriculum_lambda(epoch: int, lambda_min: float, lambda_max: float, epochs: int) -> float:
    """λ(e) = λ_min + (λ_max − λ_min)·(1 − cos(π·min(e, E)/E))/2 (METHODS.md, "CTKD")."""
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * min(epoch, epochs) / epochs)) / 2.0


@method("ctkd")
class CTKD(Method):
    family = "logit"
    paper = "Li et al., Curriculum Temperature for Knowledge Distillation"
    year = 2023
    summary = ("Curriculum Temperature KD: ce_weight·CE + kd_weight·(kd_loss or dkd_loss) at a learned τ that a "
               "gradient reversal (λ rising on a cosine curriculum) makes ascend the loss; τ is dropped at export")
    Params = CTKDParams
    # reads the teacher through softmax(z / T) alone: teacher views on augmented data (not under logit_stand)
    teacher_soft_labels = True

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        super().check_pipeline(pipeline)
        params = pipeline.distill.params
        if params.lambda_max < params.lambda_min:
            raise InputError("distill.params.lambda_max", f"the curriculum raises λ from lambda_min to lambda_max: "
                             f"expected at least lambda_min ({params.lambda_min}), got {params.lambda_max}")

    def __init__(self, params: CTKDParams, **kwargs):
        super().__init__(params, **kwargs)
        self.temperature = LearnedTemperature()
        first = next(self.student.parameters(), None)
        if first is not None:  # on the student's device, as its optimizer and the loss expect
            self.temperature.to(first.device)

    def extra_modules(self) -> nn.Module:
        return self.temperature

    def loss(self, batch, student, teacher):
        params = self.params
        ce = F.cross_entropy(student.logits, batch.y)
        with full_precision(ce.device):
            lambd = curriculum_lambda(self.epoch, params.lambda_min, params.lambda_max, params.curriculum_epochs)
            tau = params.t_min + params.t_range * torch.sigmoid(grad_reverse(self.temperature.theta, lambd))
            s, t = student.logits.float(), teacher.logits.float()
            if params.logit_stand:  # LS keeps CTKD's learned τ (METHODS.md)
                s, t = standardize_logits(s), standardize_logits(t)
            if params.loss == "kd":
                distill = kd_loss(s, t, temperature=tau)
            else:
                distill = dkd_loss(s, t, batch.y, alpha=params.alpha, beta=params.beta, temperature=tau)
        total = params.ce_weight * ce + params.kd_weight * distill
        return total, {"ce": ce.detach(), params.loss: distill.detach(), "temperature": tau.detach()}
