"""`sp`: similarity-preserving KD (Tung & Mori 2019): the student's batch similarity matrix follows the teacher's."""

from kdpipe.losses import sp_loss
from kdpipe.methods import Params, method, param
from kdpipe.methods.rkd import RelationMethod
from kdpipe.taps import declared_taps


class SPParams(Params):
    weight: float = param(3000.0, ge=0.0, low=100.0, high=10000.0, log=True,
                          description="γ: multiplies sp_loss (added to CE)")


@method("sp")
class SimilarityPreserving(RelationMethod):
    family = "relation"
    paper = "Tung and Mori, Similarity-Preserving Knowledge Distillation"
    year = 2019
    summary = "similarity-preserving KD: CE + weight·‖G̃_t − G̃_s‖_F²/N² on the last convolutional activation maps"
    Params = SPParams

    @classmethod
    def default_tap(cls, model, role):
        """The end of the model's last stage: its last convolutional activation map (the paper)."""
        return declared_taps(model, role)[-1]

    def relation(self, student_feat, teacher_feat):
        return self.params.weight * sp_loss(student_feat, teacher_feat)
