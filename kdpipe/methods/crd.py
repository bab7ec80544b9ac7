"""`crd`: Contrastive Representation Distillation (Tian, Krishnan and Isola 2020) on the penultimate embeddings.

Both embeddings pass a trainable head (Linear to feat_dim, L2-normalized). Each student embedding is contrasted
against the teacher's memory row of the same training sample (the positive) and K rows of other-class samples
(the negatives), and each teacher embedding against the student's memory the same way; NCE with the noise
distribution uniform over the n_data samples (kdpipe.losses.crd_nce_loss). The memories, their labels and the two
normalizers Z are buffers of `CRDModules.memory`, so phase checkpoints and method checkpoints hold them and a resumed
run continues with them. The heads and the memory are dropped at export.

Negatives are drawn per batch from a generator seeded by (seed, epoch, batch, rank), so a killed and resumed run
draws the same ones. When K exceeds an anchor's other-class samples (K 16384 on a dataset of 1,000), that anchor's
negatives are drawn with replacement, as RepDistiller does (`replace = k > len(cls_negative[target])`); otherwise
without replacement.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import distributed
from kdpipe.errors import InputError
from kdpipe.losses import crd_nce_loss, kd_loss
from kdpipe.methods import Params, method, param
from kdpipe.methods.rkd import RelationMethod
from kdpipe.taps import tap_shapes
from kdpipe.train import full_precision

BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOMENTUM = 0.5  # M[i] ← normalize(0.5·M[i] + 0.5·v) (RepDistiller's nce_mom)
KD_TEMPERATURE = 4.0  # CRD+KD's Hinton term, at RepDistiller's kd_T
UNSET = -1.0  # Z before the first batch fixes it


class CRDParams(Params):
    weight: float = param(0.8, gt=0.0, low=0.1, high=2.0, log=True, description="multiplies the CRD term (added to CE)")
    temperature: float = param(0.07, gt=0.0, low=0.05, high=0.2, log=True,
                               description="τ of the scores exp(m·v/τ)")
    negatives: int = param(16384, ge=1, choices=[4096, 16384],
                           description="K other-class samples contrasted per anchor (with replacement beyond the "
                                       "anchor's other-class samples)")
    feat_dim: int = param(128, ge=1, choices=[64, 128, 256], description="width of the embedding heads and memories")
    kd_weight: float = param(0.0, ge=0.0, low=0.0, high=2.0,
                             description="multiplies the optional Hinton term kd_loss at T 4 (CRD+KD: 1)")
    bank_dtype: Literal["fp32", "bf16"] = param("fp32", choices=["fp32", "bf16"],
                                                description="storage of the memories (scores are computed in fp32)")
    memory: Literal["bank", "queue"] = param("bank", choices=["bank", "queue"],
                                             description="bank: a row per training sample (the paper); queue: the "
                                                         "last queue_size embeddings with their labels, MoCo-style "
                                                         "(unpublished for CRD, effect unconfirmed)")
    queue_size: int = param(16384, ge=2, choices=[4096, 16384, 65536], when={"memory": ["queue"]},
                            description="memory queue: embeddings kept per side")


class ContrastMemory(nn.Module):
    """Per side (student, teacher) a memory of unit-norm embeddings with the label of each row, and the normalizers.

    Allocated once the training data is known (`allocate`); a state_dict of any size loads into it (a method built
    to read a trained method checkpoint has not allocated yet)."""

    def __init__(self, feat_dim: int, dtype: torch.dtype):
        super().__init__()
        self.feat_dim, self.dtype = feat_dim, dtype
        self.register_buffer("student_rows", torch.empty(0, feat_dim, dtype=dtype))
        self.register_buffer("teacher_rows", torch.empty(0, feat_dim, dtype=dtype))
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))  # −1: a queue slot never written
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))
        # Z of the scores with a student anchor (against teacher_rows) and with a teacher anchor (against student_rows).
        self.register_buffer("z_student", torch.tensor(UNSET))
        self.register_buffer("z_teacher", torch.tensor(UNSET))

    @property
    def allocated(self) -> bool:
        return len(self.labels) > 0

    @property
    def nbytes(self) -> int:
        return self.student_rows.nbytes + self.teacher_rows.nbytes

    def allocate(self, labels: torch.Tensor, seed: int) -> None:
        """Rows U(−a, a), a = 1/√(feat_dim/3) (unit norm in expectation), one per entry of `labels`."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("student_rows", "teacher_rows"):
            rows = torch.rand(len(labels), self.feat_dim, generator=generator) * (2 * bound) - bound
            setattr(self, name, rows.to(labels.device, self.dtype))
        self.labels = labels.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("student_rows", "teacher_rows", "labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CRDModules(nn.Module):
    """What CRD trains or keeps beside the student: the two embedding heads and the memory."""

    def __init__(self, student_dim: int, teacher_dim: int, params: CRDParams):
        super().__init__()
        self.student_head = nn.Linear(student_dim, params.feat_dim)
        self.teacher_head = nn.Linear(teacher_dim, params.feat_dim)
        self.memory = ContrastMemory(params.feat_dim, BANK_DTYPES[params.bank_dtype])


def draw_negatives(candidate_labels: torch.Tensor, labels: torch.Tensor, k: int,
                   generator: torch.Generator) -> torch.Tensor:
    """N×K indices into the candidates, each row uniform over the candidates of another class than its anchor's:
    distinct where the row has at least K of them, else drawn with replacement (RepDistiller's rule)."""
    other_class = (candidate_labels[None, :] != labels[:, None]).float()
    enough = other_class.sum(dim=1) >= k
    drawn = torch.empty(len(labels), k, dtype=torch.long, device=labels.device)
    for rows, replacement in ((enough, False), (~enough, True)):
        if rows.any():
            drawn[rows] = torch.multinomial(other_class[rows], k, replacement=replacement, generator=generator)
    return drawn


def memory_dots(rows: torch.Tensor, v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows[columns[n, k]] · v[n] in fp32, the rows without gradient. When the memory has no more rows than the
    gather would copy (n_data ≤ N·(K+1): CIFAR, ImageNet), v is scored against a copy of every row and the columns
    picked, far less memory traffic than gathering N·(K+1) rows; otherwise the rows are gathered (RepDistiller).
    Copies either way: the memory is updated in place before the backward pass reads them."""
    if len(rows) <= columns.numel():
        return (v @ rows.to(torch.float32, copy=True).T).gather(1, columns)
    gathered = rows.index_select(0, columns.reshape(-1)).view(*columns.shape, -1).float()
    return torch.einsum("nkd,nd->nk", gathered, v)


@method("crd")
class CRD(RelationMethod):
    family = "feature"
    paper = "Tian, Krishnan and Isola, Contrastive Representation Distillation"
    year = 2020
    summary = ("contrastive representation distillation: CE + weight·(NCE of student vs teacher memory + teacher vs "
               "student memory) on the embeddings (+ kd_weight·kd_loss); memories 2·n_data·feat_dim·(4 or 2 for "
               "bf16) bytes, reported per epoch as memory_mb")
    Params = CRDParams

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        super(RelationMethod, cls).check_pipeline(pipeline)  # NCE needs no minimum batch, unlike the relations
        params = pipeline.distill.params
        if params.memory == "queue" and params.queue_size < pipeline.data.batch_size:
            raise InputError("distill.params.queue_size", f"expected at least data.batch_size "
                             f"({pipeline.data.batch_size}): a batch enters the queue whole, got {params.queue_size}")

    @classmethod
    def tap_pairs(cls, student, teacher, taps) -> list[tuple[str, str]]:
        pairs = super().tap_pairs(student, teacher, taps)
        if len(pairs) != 1:
            raise InputError("distill.taps", f"crd contrasts one embedding per model, got {len(pairs)} taps each: "
                             "name one student and one teacher layer")
        return pairs

    def __init__(self, params: CRDParams, **kwargs):
        super().__init__(params, **kwargs)
        ((student_tap, teacher_tap),) = self.pairs
        student_shape = tap_shapes(self.student, [student_tap], self.input_shape, "distill.taps.student")[student_tap]
        teacher_shape = tap_shapes(self.teacher, [teacher_tap], self.input_shape, "distill.taps.teacher")[teacher_tap]
        self.contrast = CRDModules(math.prod(student_shape), math.prod(teacher_shape), params)
        first = next(self.student.parameters(), None)
        if first is not None:
            self.contrast.to(first.device)
        self.batch_in_epoch = 0

    def extra_modules(self):
        return self.contrast

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.batch_in_epoch = 0

    def phases(self, trainer, label="student"):
        # The memory is sized by the training data; allocated before the phase exists, so that its checkpoint
        # restores into it.
        memory = self.contrast.memory
        if not memory.allocated:
            labels = trainer.data.y_train
            if self.params.memory == "queue":
                labels = torch.full((self.params.queue_size,), -1, dtype=torch.long, device=labels.device)
            memory.allocate(labels.to(trainer.device), self.seed)
        yield from super().phases(trainer, label)

    def negatives_generator(self, device: torch.device) -> torch.Generator:
        """Seeded by (seed, epoch, batch, rank): a resumed epoch draws the negatives the interrupted one drew."""
        key = hash((self.seed, self.epoch, self.batch_in_epoch, distributed.current().rank)) & (2**63 - 1)
        return torch.Generator(device=device).manual_seed(key)

    def loss(self, batch, student, teacher):
        ce = F.cross_entropy(student.logits, batch.y)
        ((student_tap, teacher_tap),) = self.pairs
        with full_precision(ce.device):
            v_s = F.normalize(self.contrast.student_head(student.features[student_tap].flatten(1).float()), dim=1)
            v_t = F.normalize(self.contrast.teacher_head(teacher.features[teacher_tap].flatten(1).float()), dim=1)
            crd = self.contrast_loss(batch, v_s, v_t)
        self.batch_in_epoch += 1
        total, parts = ce + self.params.weight * crd, {"ce": ce.detach(), "crd": crd.detach()}
        if self.params.kd_weight > 0:
            kd = kd_loss(student.logits, teacher.logits, temperature=KD_TEMPERATURE)
            total, parts["kd"] = total + self.params.kd_weight * kd, kd.detach()
        parts["memory_mb"] = torch.tensor(self.contrast.memory.nbytes / 2**20, device=ce.device)
        return total, parts

    def contrast_loss(self, batch, v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """Both sides' NCE; then the memory takes this batch's embeddings (of every rank)."""
        memory, k = self.contrast.memory, self.params.negatives
        negatives = draw_negatives(memory.labels, batch.y, k, self.negatives_generator(batch.y.device))
        if self.params.memory == "bank":
            columns = torch.cat([batch.index[:, None], negatives], dim=1)
            dots_s = memory_dots(memory.teacher_rows, v_s, columns)
            dots_t = memory_dots(memory.student_rows, v_t, columns)
        else:  # the positive is the other network's embedding of the same sample
            positive = (v_s * v_t.detach()).sum(dim=1, keepdim=True)
            dots_s = torch.cat([positive, memory_dots(memory.teacher_rows, v_s, negatives)], dim=1)
            positive = (v_t * v_s.detach()).sum(dim=1, keepdim=True)
            dots_t = torch.cat([positive, memory_dots(memory.student_rows, v_t, negatives)], dim=1)
        n_data = len(memory.labels)
        scores_s, scores_t = torch.exp(dots_s / self.params.temperature), torch.exp(dots_t / self.params.temperature)
        for z, scores in ((memory.z_student, scores_s), (memory.z_teacher, scores_t)):
            if z.item() == UNSET:  # fixed at the first batch, the same on every rank
                world = distributed.current().world_size
                z.fill_(distributed.all_reduce_sum(scores.detach().mean()[None] * n_data)[0] / world)
        crd = crd_nce_loss(scores_s / memory.z_student, n_data) + crd_nce_loss(scores_t / memory.z_teacher, n_data)
        self.remember(batch, v_s.detach(), v_t.detach())
        return crd

    @torch.no_grad()
    def remember(self, batch, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Bank: M[i] ← normalize(0.5·M[i] + 0.5·v) on both sides; queue: the embeddings replace the oldest ones.
        Under torchrun every rank applies every rank's rows, so the memories stay equal."""
        memory = self.contrast.memory
        v_s, v_t = distributed.all_gather_rows(v_s), distributed.all_gather_rows(v_t)
        if self.params.memory == "bank":
            index = distributed.all_gather_rows(batch.index)
            for rows, v in ((memory.student_rows, v_s), (memory.teacher_rows, v_t)):
                mixed = F.normalize(MOMENTUM * rows[index].float() + (1 - MOMENTUM) * v, dim=1)
                rows.index_copy_(0, index, mixed.to(rows.dtype))
            return
        labels = distributed.all_gather_rows(batch.y)
        size = len(memory.labels)
        slots = (memory.queue_next + torch.arange(len(labels), device=labels.device)) % size
        memory.student_rows.index_copy_(0, slots, v_s.to(memory.dtype))
        memory.teacher_rows.index_copy_(0, slots, v_t.to(memory.dtype))
        memory.labels.index_copy_(0, slots, labels)
        memory.queue_next.copy_((memory.queue_next + len(labels)) % size)
