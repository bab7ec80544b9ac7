"""`rkd`: Relational KD (Park et al. 2019) on the penultimate embedding, and the base shared by the
methods that relate the samples of a batch to each other (`rkd`, `sp`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import InputError
from kdpipe.losses import rkd_loss
from kdpipe.methods import Method, Params, method, param
from kdpipe.taps import module_paths, tap_shapes
from kdpipe.train import full_precision

MIN_RELATION_BATCH = 3  # distances need a pair, angles a triple


class RelationMethod(Method):
    """CE plus a relation term over paired taps (default: `default_tap` of each model), summed over the pairs,
    computed in fp32. The relation within a batch needs at least 3 samples; a smaller last batch trains on CE alone.
    """

    @classmethod
    def default_tap(cls, model: nn.Module, role: str) -> str:
        """The model's penultimate embedding (`embedding_tap`)."""
        tap = getattr(model, "embedding_tap", None)
        if not tap:
            raise InputError(f"distill.taps.{role}", f"the {role} model declares no embedding_tap: name its penultimate "
                             f"layer here; available: {', '.join(module_paths(model))}")
        return tap

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        super().check_pipeline(pipeline)
        if pipeline.data.batch_size < MIN_RELATION_BATCH:
            raise InputError("data.batch_size", f"method '{cls.name}' relates the samples within a batch and needs "
                             f"at least {MIN_RELATION_BATCH} per batch, got {pipeline.data.batch_size}")

    @classmethod
    def tap_pairs(cls, student, teacher, taps) -> list[tuple[str, str]]:
        given_student, given_teacher = (taps.student, taps.teacher) if taps else (None, None)
        student_paths = list(given_student) if given_student is not None else [cls.default_tap(student, "student")]
        teacher_paths = list(given_teacher) if given_teacher is not None else [cls.default_tap(teacher, "teacher")]
        if len(student_paths) != len(teacher_paths) or not student_paths:
            raise InputError("distill.taps", f"the student lists {len(student_paths)} taps and the teacher "
                             f"{len(teacher_paths)}; taps pair by position, so give as many (≥ 1) of each")
        return list(zip(student_paths, teacher_paths))

    @classmethod
    def check_models(cls, pipeline, *, student, teacher, input_shape) -> None:
        pairs = cls.tap_pairs(student, teacher, pipeline.distill.taps)
        tap_shapes(student, [s for s, _ in pairs], tuple(input_shape), "distill.taps.student")
        tap_shapes(teacher, [t for _, t in pairs], tuple(input_shape), "distill.taps.teacher")

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        self.pairs = self.tap_pairs(self.student, self.teacher, self.taps)

    def student_taps(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_taps(self) -> list[str]:
        return [t for _, t in self.pairs]

    def relation(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        if len(batch.y) < MIN_RELATION_BATCH:
            return ce, {"ce": ce.detach(), "relation": torch.zeros((), device=ce.device)}
        with full_precision(ce.device):
            relation = sum(self.relation(student.features[s].float(), teacher.features[t].float()) for s, t in self.pairs)
        return ce + relation, {"ce": ce.detach(), "relation": relation.detach()}


class RKDParams(Params):
    distance_weight: float = param(25.0, ge=0.0, low=1.0, high=100.0, log=True,
                                   description="multiplies the distance term ψ_D (added to CE)")
    angle_weight: float = param(50.0, ge=0.0, low=1.0, high=200.0, log=True,
                                description="multiplies the angle term ψ_A (added to CE)")


@method("rkd")
class RKD(RelationMethod):
    family = "relation"
    paper = "Park et al., Relational Knowledge Distillation"
    year = 2019
    summary = "Relational KD: CE + distance_weight·ψ_D + angle_weight·ψ_A on the penultimate embeddings"
    Params = RKDParams

    def relation(self, student_feat, teacher_feat):
        return rkd_loss(student_feat, teacher_feat, distance_weight=self.params.distance_weight,
                        angle_weight=self.params.angle_weight)
