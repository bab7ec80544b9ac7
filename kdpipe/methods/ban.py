"""`ban`: Born-Again Networks (Furlanello et al. 2018).

Generations 1..G of the student's architecture, each from a fresh seed:
generation 1 learns from the teacher (from the labels when there is none),
generation k from the frozen generation k − 1. The export is the last
generation, or one graph whose output `logits` is the log of the generations' mean softmax (valid
logits: their softmax is that mean).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.losses import cwtm_weights, dkpp_targets
from kdpipe.methods import Method, Params, method, param
from kdpipe.train import Phase, Update


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
    """One model whose logits are log(mean_g softmax(z_g)): softmax of them is the generations' mean probability."""

    def __init__(self, generations: list[nn.Module]):
        super().__init__()
        self.generations = nn.ModuleList(generations)

    def forward(self, x):
        log_probs = torch.stack([F.log_softmax(g(x), dim=1) for g in self.generations])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.generations))


class BANParams(Params):
    generations: int = param(3, ge=1, low=1, high=5)
    variant: Literal["ban", "ban+l", "cwtm", "dkpp"] = param("ban", choices=["ban", "ban+l", "cwtm", "dkpp"])
    label_weight: float = param(1.0, ge=0.0, low=0.1, high=10.0, log=True, when={"variant": ["ban+l"]},
                                description="ban+l: multiplies the label CE (added to the soft CE)")
    export: Literal["last", "ensemble"] = param(
        "last", description="last: the last generation; ensemble: one graph, logits = log of the generations' mean softmax")


@method("ban")
class BornAgain(Method):
    family = "collaborative"
    paper = "Furlanello et al., Born-Again Neural Networks"
    year = 2018
    summary = ("Born-Again Networks: G generations of the student, each taught by the previous one "
               "(variants ban, ban+l, cwtm, dkpp); export the last or the ensemble")
    Params = BANParams
    needs_teacher = False

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        self.generations = nn.ModuleList([self.student] + [fresh_copy(self.student, self.seed + 1 + g)
                                                           for g in range(1, params.generations)])

    def extra_modules(self) -> nn.Module | None:
        """The earlier generations, when only the last one is exported."""
        if self.params.export == "ensemble" or len(self.generations) < 2:
            return None
        return self.generations[:-1]

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

    def phases(self, trainer, label="student"):
        dkpp_generator = torch.Generator().manual_seed(trainer.seed)
        previous = self.teacher
        for number, model in enumerate(self.generations, start=1):
            # The previous network is frozen: its outputs over the training split are computed once (by content).
            targets = trainer.teacher(previous, []) if previous is not None else None

            def loss(batch, shared, model=model, targets=targets):
                previous_logits = targets(batch).logits if targets is not None else None
                return self.generation_loss(model(batch.x), batch.y, previous_logits, dkpp_generator)

            name = f"gen{number}"
            yield Phase(name, [Update(name, [model], loss)], trainer.epochs, evaluate={name: model})
            model.eval()
            previous = model

    def exported(self):
        if self.params.export == "ensemble":
            return GenerationEnsemble(self.generations)
        return self.generations[-1]
