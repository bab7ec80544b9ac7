"""`mlkd`: Jin, Wang and Lin 2023, multi-level logit distillation on a weak and a strong view of each image."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from kdpipe.losses import batch_correlation_loss, class_correlation_loss, kd_loss
from kdpipe.methods import Method, method, param
from kdpipe.methods.standardize import LogitStandParams, distilled_logits
from kdpipe.taps import forward_with_taps
from kdpipe.train import Update, full_precision

# The reference's temperatures besides the configured one (METHODS.md, MLKD: {2, 3, 4, 5, 6}, 4 the configured T),
# the strong-view KD terms' (the configured one, 3, 5) and the "strong" terms the reference computes on weak logits.
OTHER_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
STRONG_TEMPERATURES = (3.0, 5.0)
WEAK_AS_STRONG_TEMPERATURES = (2.0, 6.0)


class MLKDParams(LogitStandParams):
    temperature: float = param(4.0, gt=0.0, low=1.0, high=8.0,
                               description="the configured T, beside 3, 5, 2 and 6 (under logit_stand the instance "
                                           "terms take base_temperature in its place)")
    weight: float = param(0.9, ge=0.0, low=0.3, high=3.0, log=True, description="multiplies every distillation term")
    ce_weight: float = param(0.1, ge=0.0, low=0.05, high=1.0, log=True,
                             description="multiplies CE(weak view) + CE(strong view)")
    masking: Literal["reference", "per_sample"] = param(
        "reference", choices=["reference", "per_sample"],
        description="reference: a masked term is scaled by its mask's fraction (the published results); per_sample: "
                    "the term over the masked samples (classes) alone, unpublished")


@method("mlkd")
class MultiLevelKD(Method):
    family = "logit"
    paper = "Jin, Wang and Lin, Multi-Level Logit Distillation"
    year = 2023
    summary = ("multi-level logit distillation: instance (kd_loss), batch and class correlation terms at T in "
               "{2..6} on a weak view, KD on a strong view, masked by the teacher's confidence; needs "
               "data.strong_augment")
    Params = MLKDParams
    two_views = True

    def student_update(self, trainer, label: str) -> Update:
        """Student and teacher each run on both views of the batch: the teacher online (two views per image)."""
        teacher = trainer.teacher(self.teacher, [], two_views=True)

        def loss(batch, shared):
            strong = dataclasses.replace(batch, x=batch.x_strong)
            return self.total(batch.y, forward_with_taps(self.student, batch.x, []).logits, teacher(batch).logits,
                              forward_with_taps(self.student, strong.x, []).logits, teacher(strong).logits)

        return Update(label, [self.student], loss)

    def total(self, target: torch.Tensor, student_weak: torch.Tensor, teacher_weak: torch.Tensor,
              student_strong: torch.Tensor, teacher_strong: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reference total (METHODS.md, MLKD), each distillation term × weight."""
        p = self.params
        ce = p.ce_weight * (F.cross_entropy(student_weak, target) + F.cross_entropy(student_strong, target))
        with full_precision(target.device):
            s_weak, t_weak, s_strong, t_strong = (z.float() for z in (student_weak, teacher_weak, student_strong,
                                                                      teacher_strong))
            # Confidence from the teacher's weak-view softmax at T = 1: the low-confidence half is kept.
            probs = F.softmax(t_weak, dim=1)
            samples = probs.amax(1) <= probs.amax(1).quantile(0.5)
            classes = probs.sum(0) <= probs.sum(0).quantile(0.5)
            # Instance (KD) terms read the logits as logit_stand says, at its temperature in the configured T's place.
            ls_weak, lt_weak, kd_temperature = distilled_logits(p, s_weak, t_weak, p.temperature)
            ls_strong, lt_strong, _ = distilled_logits(p, s_strong, t_strong, p.temperature)
            instance = batch = klass = torch.zeros((), device=target.device)
            for kd_t, t in zip((kd_temperature, *OTHER_TEMPERATURES), (p.temperature, *OTHER_TEMPERATURES)):
                instance = instance + self._masked_kd(ls_weak, lt_weak, kd_t, samples)
                batch = batch + self._masked_batch(s_weak, t_weak, t, samples)
                klass = klass + self._masked_class(s_weak, t_weak, t, classes)
            strong = sum(kd_loss(ls_strong, lt_strong, t) for t in (kd_temperature, *STRONG_TEMPERATURES))
            strong = strong + sum(kd_loss(ls_weak, lt_weak, t) for t in WEAK_AS_STRONG_TEMPERATURES)
            distill = p.weight * (instance + batch + klass + strong)
        parts = {"ce": ce, "kd_weak": instance, "batch": batch, "class": klass, "kd_strong": strong}
        return ce + distill, {k: v.detach() for k, v in parts.items()}

    def _masked_kd(self, student, teacher, temperature, samples):
        if self.params.masking == "per_sample":
            return kd_loss(student[samples], teacher[samples], temperature)
        return kd_loss(student, teacher, temperature) * samples.float().mean()

    def _masked_batch(self, student, teacher, temperature, samples):
        if self.params.masking == "per_sample":
            return batch_correlation_loss(student[samples], teacher[samples], temperature)
        return batch_correlation_loss(student, teacher, temperature) * samples.float().mean()

    def _masked_class(self, student, teacher, temperature, classes):
        if self.params.masking == "per_sample":
            return class_correlation_loss(student, teacher, temperature, classes=classes)
        return class_correlation_loss(student, teacher, temperature) * classes.float().mean()
