"""`none`: the student trained from labels alone, the baseline every comparison needs."""

import torch.nn.functional as F

from kdpipe.methods import Method, method


@method("none")
class Scratch(Method):
    family = "baseline"
    summary = "no distillation: the student learns from the labels alone (baseline)"
    needs_teacher = False

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        return ce, {"ce": ce.detach()}
