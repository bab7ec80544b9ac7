"""`pkt`: Probabilistic Knowledge Transfer (Passalis and Tefas 2018): the student's distribution of cosine
similarities within a batch follows the teacher's, on the penultimate embeddings."""

from kdpipe.losses import pkt_loss
from kdpipe.methods import Params, method, param
from kdpipe.methods.rkd import RelationMethod


class PKTParams(Params):
    weight: float = param(30000.0, gt=0.0, low=3000.0, high=100000.0, log=True,
                          description="multiplies pkt_loss (added to CE); RepDistiller's 30000")


@method("pkt")
class PKT(RelationMethod):
    family = "relation"
    paper = "Passalis and Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer"
    year = 2018
    summary = "probabilistic knowledge transfer: CE + weight·KL of the batch's cosine-similarity distributions"
    Params = PKTParams

    def relation(self, student_feat, teacher_feat):
        return self.params.weight * pkt_loss(student_feat, teacher_feat)
