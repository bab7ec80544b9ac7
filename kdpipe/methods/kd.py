"""`kd`: Hinton et al. 2015, logit distillation at temperature T."""

import torch.nn.functional as F

from kdpipe.losses import kd_loss
from kdpipe.methods import Method, Params, method, param


class KDParams(Params):
    temperature: float = param(4.0, gt=0.0, low=1.0, high=20.0, log=True, description="T of both softmaxes")
    alpha: float = param(0.9, ge=0.0, le=1.0, low=0.0, high=1.0,
                         description="multiplies the KD term (as RepDistiller's -a); CE gets 1 − alpha")


@method("kd")
class HintonKD(Method):
    family = "logit"
    paper = "Hinton, Vinyals and Dean, Distilling the Knowledge in a Neural Network"
    year = 2015
    summary = "Hinton KD: (1 − alpha)·CE + alpha·kd_loss (T²·KL(p_t^T ‖ p_s^T)); alpha multiplies the KD term"
    Params = KDParams
    teacher_soft_labels = True  # kd_loss reads the teacher through softmax(z / T) alone

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        kd = kd_loss(student.logits, teacher.logits, temperature=self.params.temperature)
        total = (1.0 - self.params.alpha) * ce + self.params.alpha * kd
        return total, {"ce": ce.detach(), "kd": kd.detach()}
