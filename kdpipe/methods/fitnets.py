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
from kdpipe.taps import TapPair, forward_with_taps
from kdpipe.train import Trainer, make_optimizer


class FitNetsParams(Params):
    stages: Literal[1, 2] = param(2, choices=[1, 2])
    hint_epochs: int = param(10, ge=1, choices=[5, 10, 20])
    hint_weight: float = param(100.0, gt=0.0, low=1.0, high=1000.0, log=True)
    temperature: float = param(4.0, gt=0.0, low=1.0, high=20.0, log=True)
    alpha: float = param(0.9, ge=0.0, le=1.0, low=0.0, high=1.0)


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
    summary = ("FitNets: stages 2 = hint stage (student up to the guided layer + regressor, hint_epochs) then KD; "
               "stages 1 = CE + hint_weight·hint")
    Params = FitNetsParams

    @classmethod
    def default_positions(cls, count):
        return [count // 2]  # the paper guides the student's middle layer with the teacher's middle layer

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

    def fit(self, trainer, label="student"):
        if self.params.stages == 1:
            return super().fit(trainer, label)
        self.fit_hints(trainer, label=f"{label}_hint")
        kd = HintonKD(KDParams(temperature=self.params.temperature, alpha=self.params.alpha), student=self.student,
                      teacher=self.teacher, num_classes=self.num_classes, input_shape=self.input_shape)
        return kd.fit(trainer, label)

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

    def fit_hints(self, trainer: Trainer, label: str) -> None:
        """Stage 1 of the paper: the student prefix and the regressors learn the teacher's hints alone.

        Its own loop rather than Trainer.fit, which would keep the epoch of best validation accuracy: the
        student's head is untrained here, so that accuracy says nothing about the hints.
        """
        teacher_outputs = trainer.teacher_outputs(self.teacher, self.teacher_taps())
        student_taps = self.student_taps()
        epochs = self.params.hint_epochs
        opt, schedule = make_optimizer(self.guided_parameters() + list(self.regressors.parameters()), trainer.optimizer,
                                       epochs, trainer.steps_per_epoch)
        generator = torch.Generator().manual_seed(trainer.seed)
        self.student.train()
        self.regressors.train()
        for epoch in range(1, epochs + 1):
            total, count = 0.0, 0
            for batch in trainer.batches(generator):
                student_features = forward_with_taps(self.student, batch.x, student_taps).features
                hint = self.hint(student_features, teacher_outputs.select(batch.index).features)
                if not torch.isfinite(hint):
                    raise FloatingPointError(f"{label} loss became {hint.item()} at epoch {epoch}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                hint.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                total = total + hint.detach() * len(batch.y)
                count += len(batch.y)
            trainer.on_epoch(label, epoch, epochs, {"train_hint": float(total) / max(count, 1)})
