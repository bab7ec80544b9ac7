"""`ban`: Born-Again Networks (Furlanello et al. 2018).

Generations 1..G of the student's architecture, each from a fresh seed:
generation 1 learns from the teacher (from the labels when there is none),
generation k from the frozen generation k − 1. The export is the last
generation, or one graph averaging every generation's softmax.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.losses import cwtm_weights, dkpp_targets
from kdpipe.methods import Method, Params, method, param


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with every layer re-initialized from `seed`; no parameter is shared with `model`.

    Layers are reset through their `reset_parameters` (all torch layers have one); a parameter set outside
    such a layer keeps a copy of `model`'s value.
    """
    clone = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in clone.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone.train()


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """−Σ_c q_c log p_c, mean over the batch."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class GenerationEnsemble(nn.Module):
    """One model whose output is the mean of the generations' softmax outputs (probabilities, not logits)."""

    def __init__(self, generations: list[nn.Module]):
        super().__init__()
        self.generations = nn.ModuleList(generations)

    def forward(self, x):
        return torch.stack([F.softmax(g(x), dim=1) for g in self.generations]).mean(dim=0)


class BANParams(Params):
    generations: int = param(3, ge=1, low=1, high=5)
    variant: Literal["ban", "ban+l", "cwtm", "dkpp"] = param("ban", choices=["ban", "ban+l", "cwtm", "dkpp"])
    label_weight: float = param(1.0, ge=0.0, low=0.1, high=10.0, log=True)
    export: Literal["last", "ensemble"] = param("last")


@method("ban")
class BornAgain(Method):
    summary = ("Born-Again Networks: G generations of the student, each taught by the previous one "
               "(variants ban, ban+l, cwtm, dkpp); export the last or the ensemble")
    Params = BANParams
    needs_teacher = False
    fit_returns_student = False

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        self.generations: list[nn.Module] = []

    def extra_modules(self) -> nn.Module | None:
        """The earlier generations, checkpointed when only the last one is exported."""
        if self.params.export == "ensemble" or len(self.generations) < 2:
            return None
        return nn.ModuleList(self.generations[:-1])

    def generation_loss(self, logits: torch.Tensor, y: torch.Tensor, previous_logits: torch.Tensor | None,
                        generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits, y)
        if previous_logits is None:
            return ce, {"ce": ce.detach()}
        variant = self.params.variant
        if variant == "cwtm":
            weighted = (cwtm_weights(previous_logits) * F.cross_entropy(logits, y, reduction="none")).sum()
            return weighted, {"weighted_ce": weighted.detach(), "ce": ce.detach()}
        target = dkpp_targets(previous_logits, generator) if variant == "dkpp" else F.softmax(previous_logits, dim=1)
        soft = soft_cross_entropy(logits, target)
        total = soft + self.params.label_weight * ce if variant == "ban+l" else soft
        return total, {"soft_ce": soft.detach(), "ce": ce.detach()}

    def fit(self, trainer, label="student"):
        self.generations = [self.student] + [fresh_copy(self.student, trainer.seed + 1 + g)
                                             for g in range(1, self.params.generations)]
        dkpp_generator = torch.Generator().manual_seed(trainer.seed)
        previous = self.teacher
        for number, model in enumerate(self.generations, start=1):
            # The previous network is frozen: its eval-mode outputs over the training split are computed once.
            targets = trainer.teacher_step(previous, []) if previous is not None else None

            def step(batch, model=model, targets=targets):
                previous_logits = targets(batch).logits if targets is not None else None
                return self.generation_loss(model(batch.x), batch.y, previous_logits, dkpp_generator)

            trainer.fit(model, step, label=f"gen{number}")
            model.eval()
            previous = model
        if self.params.export == "ensemble":
            return GenerationEnsemble(self.generations)
        return self.generations[-1]
