"""Is a classifier's test accuracy clearly above chance? The `above_chance` gate (validate.gates.above_chance).

Chance is what a classifier scores without looking at the images: always answering the test split's most common
class scores its share, which is at least 1/C. An accuracy is clearly above it when guessing at that rate would
score as much rarely: the one-sided exact binomial test, P(X ≥ correct) for X ~ Binomial(test size, chance), at
most the gate's significance level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdpipe.results import Gate

# What makes a model score at chance, most often: said when the gate fails.
CAUSES = {
    "teacher": "the images' decoding (blank, clipped or all alike), labels that do not belong to their images "
               "(shuffled, or mapped differently between splits), or a random classifier head (weights with "
               "reset_head and too little training)",
    "student": "the data (decoding, labels), training that did not converge (distill.optimizer.lr, "
               "distill.epochs), or a model whose input (scaling, normalization, channel order) or class order is "
               "not the data's",
}


@dataclass(frozen=True)
class ChanceLevel:
    rate: float  # the share of the test split's most common class
    size: int  # test samples

    @classmethod
    def of(cls, labels: torch.Tensor) -> ChanceLevel:
        counts = torch.bincount(labels.cpu())
        return cls(rate=counts.max().item() / len(labels), size=len(labels))

    def p_value(self, accuracy: float) -> float:
        """P(X ≥ correct) for X ~ Binomial(size, rate): how often guessing scores at least `accuracy`."""
        correct = round(accuracy * self.size)
        if correct == 0 or self.rate >= 1.0:
            return 1.0
        outcomes = torch.arange(correct, self.size + 1, dtype=torch.float64)
        guessing = torch.distributions.Binomial(self.size, torch.tensor(self.rate, dtype=torch.float64))
        return torch.logsumexp(guessing.log_prob(outcomes), 0).exp().clamp(max=1.0).item()

    def gate(self, name: str, accuracy: float, significance: float) -> Gate:
        """The above-chance gate on one model's accuracy: its p-value against the significance level."""
        p_value = self.p_value(accuracy)
        return Gate(name, p_value, significance, p_value <= significance)

    def verdict(self, role: str, accuracy: float, significance: float) -> str:
        """The line that says a `role` (teacher, student) model's accuracy is not clearly above chance, and why."""
        return (f"{role} test accuracy {accuracy:.4f} is not significantly above chance ({self.rate:.4f}, the most "
                f"common class's share of the {self.size} test samples): p = {self.p_value(accuracy):.2g} > "
                f"validate.gates.above_chance {significance}; likely wrong: {CAUSES[role]}")
