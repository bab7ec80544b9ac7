"""`dml`: Deep Mutual Learning (Zhang et al. 2018).

K ≥ 2 peers of any architectures train from scratch together, each with its own
optimizer, on the same batches: L_k = CE(y, z_k) + dml_loss(z_k, the others).
Peer 0 is the pipeline's student. A teacher, when the pipeline names one, joins
as one more peer that stays fixed (its cached outputs are a mimicry target for
every peer; it never trains); with `teacher: null` this is plain DML.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdpipe.config import ModelConfig
from kdpipe.errors import InputError
from kdpipe.losses import dml_loss
from kdpipe.methods import Method, Params, method, param
from kdpipe.methods.ban import fresh_copy
from kdpipe.models import build_model
from kdpipe.train import accuracy, make_optimizer


class DMLParams(Params):
    peers: list[ModelConfig] | int = Field(2, description="a count K of networks, all the student's architecture; "
                                           "or the model sections of the peers trained beside the student (K = 1 + their number)")
    target: Literal["pairwise", "average"] = param("pairwise", choices=["pairwise", "average"])
    export_peer: Literal["best"] | Annotated[int, Field(ge=0)] = Field(
        "best", description="the peer to export: its index (0 is the student) or 'best' on validation")


def peer_count(params: DMLParams) -> int:
    return params.peers if isinstance(params.peers, int) else 1 + len(params.peers)


@method("dml")
class DeepMutualLearning(Method):
    summary = "Deep Mutual Learning: K peers trained together, each on CE + KL to the others; exports one peer"
    Params = DMLParams
    needs_teacher = False
    fit_returns_student = False

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        super().check_pipeline(pipeline)
        params = cls.Params(**pipeline.distill.params)
        count = peer_count(params)
        if count < 2:
            raise InputError("distill.params.peers", f"dml trains at least 2 peers (the student and one more), got {count}")
        if isinstance(params.export_peer, int) and params.export_peer >= count:
            raise InputError("distill.params.export_peer", f"there are {count} peers (0..{count - 1}), got {params.export_peer}")

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        self.peers: list[nn.Module] = []
        self.exported = 0

    def build_peers(self, seed: int) -> list[nn.Module]:
        """Peer 0 is the student; peer k is built from seed + 1 + k (the student's is seed + 1)."""
        if isinstance(self.params.peers, int):
            others = [fresh_copy(self.student, seed + 1 + k) for k in range(1, self.params.peers)]
        else:
            device = next(self.student.parameters()).device
            others = []
            for k, cfg in enumerate(self.params.peers, start=1):
                with torch.random.fork_rng():
                    torch.manual_seed(seed + 1 + k)
                    peer = build_model(cfg, f"distill.params.peers.{k - 1}", self.input_shape, self.num_classes)
                others.append(peer.to(device))
        return [self.student, *others]

    def extra_modules(self) -> nn.Module | None:
        """The peers that are not exported, checkpointed beside the exported one."""
        rest = [p for k, p in enumerate(self.peers) if k != self.exported]
        return nn.ModuleList(rest) if rest else None

    def peer_losses(self, peers: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                    fixed_logits: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """L_k for every peer; each peer's parameters reach only its own loss (dml_loss detaches the others)."""
        logits = [peer(x) for peer in peers]
        losses, parts = [], []
        for k, z in enumerate(logits):
            ce = F.cross_entropy(z, y)
            mimicry = dml_loss(z, [*logits[:k], *logits[k + 1:], *fixed_logits], target=self.params.target)
            losses.append(ce + mimicry)
            parts.append({"loss": (ce + mimicry).detach(), "ce": ce.detach(), "mimicry": mimicry.detach()})
        return losses, parts

    def fit(self, trainer, label="student"):
        if trainer.dist.enabled:  # each peer has its own optimizer here, with no gradient synchronization
            raise InputError("distill.method", "dml trains its peers in one process; run it without torchrun")
        self.peers = peers = self.build_peers(trainer.seed)
        fixed = trainer.teacher_step(self.teacher, []) if self.teacher is not None else None
        optimizers = [make_optimizer(p.parameters(), trainer.optimizer, trainer.epochs, trainer.steps_per_epoch) for p in peers]
        generator = torch.Generator().manual_seed(trainer.seed)
        best = [(-1.0, None)] * len(peers)
        for epoch in range(1, trainer.epochs + 1):
            for peer in peers:
                peer.train()
            sums = [dict.fromkeys(("loss", "ce", "mimicry"), 0.0) for _ in peers]
            count = 0
            for batch in trainer.batches(generator):
                with trainer.autocast():
                    losses, parts = self.peer_losses(peers, batch.x, batch.y, [fixed(batch).logits] if fixed is not None else [])
                total = torch.stack(losses).sum()
                if not torch.isfinite(total):
                    raise FloatingPointError(f"dml loss became {total.item()} at epoch {epoch}; lower the learning rate")
                for optimizer, _ in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                total.backward()  # the sum: peer k's gradient comes from L_k alone
                for optimizer, schedule in optimizers:
                    optimizer.step()
                    if schedule is not None:
                        schedule.step()
                for peer_sums, peer_parts in zip(sums, parts):
                    for name, value in peer_parts.items():
                        peer_sums[name] += value * len(batch.y)
                count += len(batch.y)
            for k, peer in enumerate(peers):
                val_acc = accuracy(peer, trainer.data.x_val, trainer.data.y_val)
                metrics = {f"train_{name}": (value / count).item() for name, value in sums[k].items()}
                trainer.on_epoch(f"peer{k}", epoch, trainer.epochs, {**metrics, "val_accuracy": val_acc})
                if val_acc > best[k][0]:
                    best[k] = (val_acc, copy.deepcopy(peer.state_dict()))
        for peer, (_, state) in zip(peers, best):
            if state is not None:
                peer.load_state_dict(state)
        if self.params.export_peer == "best":
            self.exported = max(range(len(peers)), key=lambda k: best[k][0])
        else:
            self.exported = self.params.export_peer
        return peers[self.exported]
