"""`sp`: similarity-preserving KD (Tung & Mori 2019): the student's batch similarity matrix follows the teacher's."""

from kdpipe.losses import sp_loss
from kdpipe.methods import Params, method, param
from kdpipe.methods.rkd import RelationMethod


class SPParams(Params):
    weight: float = param(3000.0, ge=0.0, low=100.0, high=10000.0, log=True)


@method("sp")
class SimilarityPreserving(RelationMethod):
    summary = "similarity-preserving KD: CE + weight·‖G̃_t − G̃_s‖_F²/N² on the penultimate embeddings"
    Params = SPParams

    def relation(self, student_feat, teacher_feat):
        return self.params.weight * sp_loss(student_feat, teacher_feat)
