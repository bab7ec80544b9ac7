"""`dist`: DIST (Huang et al. 2022): the student matches the teacher's class ranking relations by correlation."""

import torch.nn.functional as F

from kdpipe.errors import InputError
from kdpipe.losses import dist_loss
from kdpipe.methods import Method, method, param
from kdpipe.methods.standardize import LogitStandParams, distilled_logits
from kdpipe.train import full_precision

MIN_DIST_BATCH = 2  # the intra term correlates each class over the batch


class DISTParams(LogitStandParams):
    beta: float = param(2.0, ge=0.0, low=0.5, high=4.0,
                        description="multiplies the inter-class term (per sample); the reference's 1 × weight 2")
    gamma: float = param(2.0, ge=0.0, low=0.5, high=4.0,
                         description="multiplies the intra-class term (per class, over the batch)")
    temperature: float = param(4.0, gt=0.0, low=1.0, high=8.0, when={"logit_stand": [False]},
                               description="τ of both softmaxes, CIFAR 4 (logit_stand: base_temperature replaces it)")


@method("dist")
class DIST(Method):
    family = "logit"
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher"
    year = 2022
    summary = ("DIST: CE + τ²·(beta·inter + gamma·intra), 1 − Pearson correlation of softmax(z/τ) per sample and per "
               "class over the batch; the class term is a statistic of each device's batch share under torchrun "
               "(as the reference computes it)")
    Params = DISTParams
    # reads the teacher through softmax(z / T) alone: teacher views on augmented data (not under logit_stand)
    teacher_soft_labels = True

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        super().check_pipeline(pipeline)
        if pipeline.data.batch_size < MIN_DIST_BATCH:
            raise InputError("data.batch_size", f"method 'dist' correlates each class over the batch and needs at "
                             f"least {MIN_DIST_BATCH} samples per batch, got {pipeline.data.batch_size}")

    def loss(self, batch, student, teacher):
        params = self.params
        ce = F.cross_entropy(student.logits, batch.y)
        with full_precision(ce.device):
            s, t, temperature = distilled_logits(params, student.logits.float(), teacher.logits.float(),
                                                 params.temperature)
            dist = dist_loss(s, t, beta=params.beta, gamma=params.gamma, temperature=temperature)
        return ce + dist, {"ce": ce.detach(), "dist": dist.detach()}
