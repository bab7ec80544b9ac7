"""`fitnets`: Romero et al. 2015, hints from a teacher layer guide a student layer through a regressor."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import InputError
from kdpipe.losses import fitnet_loss
from kdpipe.methods import FeatureMethod, Params, method, param
from kdpipe.methods.kd import HintonKD, KDParams
from kdpipe.taps import TapPair, forward_with_taps, pair_middle
from kdpipe.train import Phase, Trainer, Update


class FitNetsParams(Params):
    stages: Literal[1, 2] = param(2, choices=[1, 2], description="2: hint stage then KD (the paper); 1: joint")
    hint_epochs: int = param(10, ge=1, choices=[5, 10, 20], when={"stages": [2]},
                             description="epochs of the hint stage (stages 2)")
    hint_weight: float = param(100.0, gt=0.0, low=1.0, high=1000.0, log=True, when={"stages": [1]},
                               description="stages 1: multiplies the hint loss (added to CE)")
    temperature: float = param(4.0, gt=0.0, low=1.0, high=20.0, log=True, when={"stages": [2]},
                               description="stages 2: T of the KD stage")
    alpha: float = param(0.9, ge=0.0, le=1.0, low=0.0, high=1.0, when={"stages": [2]},
                         description="stages 2: multiplies the KD term of the KD stage; CE gets 1 − alpha")


def make_regressor(pair: TapPair) -> nn.Module:
    """Maps the student's guided-layer output to the teacher's hint shape (METHODS.md, FitNets)."""
    s, t = pair.student_shape, pair.teacher_shape
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == 3 and len(t) == 3:
        (k_s, h_s, w_s), (k_t, h_t, w_t) = s, t
        if (h_s, w_s) == (h_t, w_t):
            conv = nn.Conv2d(k_s, k_t, kernel_size=1)
        elif (h_s, w_s) == (2 * h_t, 2 * w_t):
            conv = nn.Conv2d(k_s, k_t, kernel_size=3, stride=2, padding=1)
        elif (2 * h_s, 2 * w_s) == (h_t, w_t):
            conv = nn.ConvTranspose2d(k_s, k_t, kernel_size=4, stride=2, padding=1)
        else:
            raise InputError("distill.taps", f"fitnets cannot regress {pair.describe()}: the spatial sizes must be equal, "
                             "or one twice the other")
        return nn.Sequential(conv, nn.BatchNorm2d(k_t), nn.ReLU())
    raise InputError("distill.taps", f"fitnets cannot regress {pair.describe()}: both need to be feature maps K×H×W "
                     "or both vectors K")


@method("fitnets")
class FitNets(FeatureMethod):
    family = "feature"
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets"
    year = 2015
    summary = ("FitNets: stages 2 = hint stage (the student up to its middle stage's end + a regressor learn the "
               "teacher's middle stage, hint_epochs) then KD ((1 − alpha)·CE + alpha·kd_loss); "
               "stages 1 = CE + hint_weight·hint")
    Params = FitNetsParams

    default_pairs = staticmethod(pair_middle)  # the paper: the student's middle layer guided by the teacher's

    @classmethod
    def check_pair(cls, pair, params):
        make_regressor(pair)

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.regressors = nn.ModuleList(make_regressor(pair) for pair in self.pairs)
        first = next(self.student.parameters(), None)
        if first is not None:
            self.regressors.to(first.device)

    def extra_modules(self):
        return self.regressors

    def hint(self, student_features, teacher_features) -> torch.Tensor:
        return sum(fitnet_loss(regressor(student_features[pair.student]), teacher_features[pair.teacher])
                   for regressor, pair in zip(self.regressors, self.pairs))

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        hint = self.hint(student.features, teacher.features)
        return ce + self.params.hint_weight * hint, {"ce": ce.detach(), "hint": hint.detach()}

    def phases(self, trainer, label="student"):
        if self.params.stages == 1:
            yield from super().phases(trainer, label)
            return
        yield self.hint_phase(trainer, f"{label}_hint")
        kd = HintonKD(KDParams(temperature=self.params.temperature, alpha=self.params.alpha), student=self.student,
                      teacher=self.teacher, num_classes=self.num_classes, input_shape=self.input_shape)
        yield from kd.phases(trainer, label)

    def guided_parameters(self) -> list[nn.Parameter]:
        """The student's parameters the guided layers depend on: the prefix the hint stage trains."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        was_training = self.student.training
        self.student.eval()  # a pass on zeros must not move BatchNorm statistics
        try:
            x = torch.zeros(2, *self.input_shape, device=params[0].device)
            features = forward_with_taps(self.student, x, self.student_taps()).features
        finally:
            self.student.train(was_training)
        grads = torch.autograd.grad(sum(f.sum() for f in features.values()), params, allow_unused=True)
        return [p for p, g in zip(params, grads) if g is not None]

    def hint_phase(self, trainer: Trainer, label: str) -> Phase:
        """Stage 1 of the paper: the student up to the guided layer and the regressors learn the teacher's hints.

        Nothing is evaluated: the student's head is untrained here, so validation accuracy says nothing about the
        hints, and the last epoch's weights stand.
        """
        teacher = trainer.teacher(self.teacher, self.teacher_taps())
        student_taps = self.student_taps()

        def loss(batch, shared):
            student_features = forward_with_taps(self.student, batch.x, student_taps).features
            hint = self.hint(student_features, teacher(batch).features)
            return hint, {"hint": hint.detach()}

        params = self.guided_parameters() + list(self.regressors.parameters())
        return Phase(label, [Update(label, [self.student, self.regressors], loss, params=params)], self.params.hint_epochs)
