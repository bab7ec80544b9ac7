"""`adversarial`: KD with conditional adversarial networks (Xu et al. 2017).

The student generates logits; a discriminator on logit vectors (never images)
tells the teacher's from the student's. Every batch takes one discriminator
step with the student frozen, then one student step with the discriminator frozen: two updates of the one
training loop, so the discriminator and its optimizer are checkpointed, synchronized across processes and
scaled under fp16 like the student.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import OptimizerConfig
from kdpipe.losses import adversarial_d_loss, adversarial_g_loss
from kdpipe.methods import Method, Params, method, param
from kdpipe.taps import Outputs
from kdpipe.train import Phase, Update


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h):
        return F.leaky_relu(h + self.fc2(F.leaky_relu(self.fc1(h), 0.2)), 0.2)


class Discriminator(nn.Module):
    """Residual MLP on logit vectors: one raw source score per sample, plus `num_classes` class outputs when `aux`."""

    def __init__(self, num_classes: int, hidden: int = 256, blocks: int = 3, aux: bool = False):
        super().__init__()
        self.stem = nn.Linear(num_classes, hidden)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(blocks)])
        self.head = nn.Linear(hidden, 1 + (num_classes if aux else 0))

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(source scores N, class logits N×C or None)."""
        out = self.head(self.blocks(F.leaky_relu(self.stem(logits), 0.2)))
        return out[:, 0], (out[:, 1:] if out.shape[1] > 1 else None)


@contextmanager
def frozen(module: nn.Module):
    """Build the graph without gradients into `module`'s parameters (they still pass gradients through)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AdversarialParams(Params):
    gan_mode: Literal["bce", "lsgan"] = param("lsgan", choices=["bce", "lsgan"])
    adv_weight: float = param(0.1, ge=0.0, low=0.01, high=1.0, log=True,
                              description="multiplies the student's adversarial (generator) loss")
    l1_weight: float = param(1.0, ge=0.0, low=0.1, high=10.0, log=True, description="multiplies mean|z_s − z_t|")
    ce_weight: float = param(1.0, ge=0.0, low=0.0, high=1.0, description="multiplies CE(y, z_s)")
    aux_classifier: bool = param(True, choices=[False, True],
                                 description="the paper's conditional discriminator: a class head beside the source score")
    class_weight: float = param(1.0, ge=0.0, low=0.1, high=10.0, log=True, when={"aux_classifier": [True]},
                                description="multiplies the class-head CE, in D's loss and in the student's")
    hidden: int = param(256, ge=1, choices=[64, 128, 256])
    blocks: int = param(3, ge=0, low=1, high=4)
    d_lr: float = param(1.0e-3, gt=0.0, low=1.0e-4, high=1.0e-2, log=True, description="the discriminator's Adam lr")


@method("adversarial")
class Adversarial(Method):
    family = "adversarial"
    paper = ("Xu, Hsu and Huang, Training Shallow and Thin Networks for Acceleration via Knowledge Distillation "
             "with Conditional Adversarial Networks")
    year = 2018
    summary = ("KD with conditional adversarial networks: adv_weight·GAN + l1_weight·mean|z_s − z_t| + ce_weight·CE "
               "(+ class_weight·class-head CE), a residual-MLP discriminator on logits")
    Params = AdversarialParams

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        device = next(self.student.parameters()).device
        self.discriminator = Discriminator(self.num_classes, params.hidden, params.blocks, params.aux_classifier).to(device)

    def extra_modules(self) -> nn.Module:
        return self.discriminator

    def discriminator_loss(self, student_logits, teacher_logits, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on teacher (real) and student (fake) logits; the student gets no gradient from it."""
        d_teacher, class_teacher = self.discriminator(teacher_logits)
        d_student, class_student = self.discriminator(student_logits.detach())
        loss = adversarial_d_loss(d_teacher, d_student, mode=self.params.gan_mode)
        if class_teacher is not None:
            loss = loss + self.params.class_weight * (F.cross_entropy(class_teacher, y) + F.cross_entropy(class_student, y))
        return loss, {}

    def loss(self, batch, student, teacher):
        """The student's loss against the current D, which stays frozen (no gradient into its parameters)."""
        z_s, z_t = student.logits, teacher.logits
        with frozen(self.discriminator):
            d_student, class_student = self.discriminator(z_s)
        adversarial = adversarial_g_loss(d_student, mode=self.params.gan_mode)
        l1 = (z_s - z_t).abs().mean()
        ce = F.cross_entropy(z_s, batch.y)
        total = self.params.adv_weight * adversarial + self.params.l1_weight * l1 + self.params.ce_weight * ce
        parts = {"adversarial": adversarial.detach(), "l1": l1.detach(), "ce": ce.detach()}
        if class_student is not None:
            class_ce = F.cross_entropy(class_student, batch.y)
            total = total + self.params.class_weight * class_ce
            parts["class_ce"] = class_ce.detach()
        return total, parts

    def phases(self, trainer, label="student"):
        teacher = trainer.teacher(self.teacher, [], self.cache_teacher)

        # One student forward per batch serves both updates: D's step sees its logits detached, and the student's
        # step (which follows before any parameter of the student moves) backpropagates through them.
        def outputs(batch, shared):
            if "student" not in shared:
                shared["student"], shared["teacher"] = Outputs(self.student(batch.x)), teacher(batch)
            return shared["student"], shared["teacher"]

        def d_loss(batch, shared):
            student_out, teacher_out = outputs(batch, shared)
            return self.discriminator_loss(student_out.logits, teacher_out.logits, batch.y)

        def student_loss(batch, shared):
            return self.loss(batch, *outputs(batch, shared))

        d_optimizer = OptimizerConfig(name="adam", lr=self.params.d_lr, weight_decay=0.0, scheduler="none")
        yield Phase(label, [Update("discriminator", [self.discriminator], d_loss, optimizer=d_optimizer),
                            Update(label, [self.student], student_loss)],
                    trainer.epochs, evaluate={label: self.student})
