"""Logit standardization (Sun et al. 2024, "Logit Standardization in Knowledge Distillation"): a switch every
logit method accepts, not a method of its own.

With `logit_stand: true`, every softmax/KL term of the method reads standardize_logits(z_s) and standardize_logits(z_t)
at `base_temperature` in place of the method's own temperature (CTKD keeps its learned τ); the CE term keeps the raw
logits (METHODS.md, "Logit standardization").
"""

from __future__ import annotations

import torch

from kdpipe.losses import standardize_logits
from kdpipe.methods import Params, param


class LogitStandSwitch(Params):
    """The switch alone, for a method whose temperature LS keeps (CTKD's learned τ): no base_temperature."""

    logit_stand: bool = param(False, choices=[False, True],
                              description="standardize both logit rows before every softmax of the distillation term")


class LogitStandParams(LogitStandSwitch):
    base_temperature: float = param(2.0, gt=0.0, low=1.0, high=4.0, when={"logit_stand": [True]},
                                    description="logit_stand: the temperature of the standardized logits")


def distilled_logits(params: LogitStandParams, student: torch.Tensor, teacher: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The (student, teacher) logits and temperature the method's softmax terms read: standardized at
    base_temperature under logit_stand, else as they are at the method's `temperature`."""
    if not params.logit_stand:
        return student, teacher, temperature
    return standardize_logits(student.float()), standardize_logits(teacher.float()), params.base_temperature
