"""`dml`: Deep Mutual Learning (Zhang et al. 2018).

K ≥ 2 peers of any architectures train from scratch together, each with its own
optimizer, on the same batches: L_k = CE(y, z_k) + dml_loss(z_k, the others). By default in the order of
the paper's Algorithm 1: update peer 1, recompute its predictions, update peer 2, ... (`update:
sequential`); `update: simultaneous` steps every peer from one forward pass.
Peer 0 is the pipeline's student. A teacher, when the pipeline names one, joins
as one more peer that stays fixed (its cached outputs are a mimicry target for
every peer; it never trains); with `teacher: null` this is plain DML.
"""

from __future__ import annotations

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
from kdpipe.train import Phase, Update


class DMLParams(Params):
    peers: list[ModelConfig] | int = Field(2, description="a count K of networks, all the student's architecture; "
                                           "or the model sections of the peers trained beside the student (K = 1 + their number)")
    target: Literal["pairwise", "average"] = param("pairwise", choices=["pairwise", "average"])
    update: Literal["sequential", "simultaneous"] = param(
        "sequential", choices=["sequential", "simultaneous"],
        description="sequential: the paper's Algorithm 1 (peer by peer, each against the others' latest predictions)")
    export_peer: Literal["best"] | Annotated[int, Field(ge=0)] = Field(
        "best", description="the peer to export: its index (0 is the student) or 'best' on validation")


def peer_count(params: DMLParams) -> int:
    return params.peers if isinstance(params.peers, int) else 1 + len(params.peers)


@method("dml")
class DeepMutualLearning(Method):
    family = "collaborative"
    paper = "Zhang et al., Deep Mutual Learning"
    year = 2018
    summary = "Deep Mutual Learning: K peers trained together, each on CE + KL to the others; exports one peer"
    Params = DMLParams
    needs_teacher = False

    @classmethod
    def check_pipeline(cls, pipeline) -> None:
        super().check_pipeline(pipeline)
        params = pipeline.distill.params
        count = peer_count(params)
        if count < 2:
            raise InputError("distill.params.peers", f"dml trains at least 2 peers (the student and one more), got {count}")
        if isinstance(params.export_peer, int) and params.export_peer >= count:
            raise InputError("distill.params.export_peer", f"there are {count} peers (0..{count - 1}), got {params.export_peer}")

    def __init__(self, params: Params, **kwargs):
        super().__init__(params, **kwargs)
        self.peers = nn.ModuleList(self.build_peers(self.seed))
        # Chosen after training ('best'): a buffer, so that the method's state says which peer it exports.
        self.register_buffer("exported_index", torch.tensor(0))

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
        """The peers that are not exported."""
        rest = [p for k, p in enumerate(self.peers) if k != int(self.exported_index)]
        return nn.ModuleList(rest) if rest else None

    def peer_loss(self, k: int, z_k: torch.Tensor, others: list[torch.Tensor], y: torch.Tensor):
        """L_k; `others` are detached inside dml_loss, so peer k's parameters reach only its own loss."""
        ce = F.cross_entropy(z_k, y)
        mimicry = dml_loss(z_k, others, target=self.params.target)
        return ce + mimicry, {"ce": ce.detach(), "mimicry": mimicry.detach()}

    def sequential_update(self, k: int, fixed) -> Update:
        """Peer k's step against the latest predictions of the others: a peer updated earlier in this step is
        predicted again (without gradient) after its update, as Algorithm 1 recomputes p_1..p_K."""
        peers = self.peers

        def loss(batch, shared):
            latest = shared.setdefault("latest", {})
            z_k = peers[k](batch.x)
            for other in range(len(peers)):
                if other != k and other not in latest:
                    with torch.no_grad():
                        latest[other] = peers[other](batch.x)
            latest.pop(k, None)  # peer k is about to change: its prediction goes stale
            fixed_logits = [fixed(batch).logits] if fixed is not None else []
            return self.peer_loss(k, z_k, [latest[o] for o in range(len(peers)) if o != k] + fixed_logits, batch.y)

        return Update(f"peer{k}", [peers[k]], loss)

    def simultaneous_update(self, fixed) -> Update:
        peers = self.peers

        def loss(batch, shared):
            logits = [peer(batch.x) for peer in peers]
            fixed_logits = [fixed(batch).logits] if fixed is not None else []
            losses = [self.peer_loss(k, z, logits[:k] + logits[k + 1:] + fixed_logits, batch.y) for k, z in enumerate(logits)]
            parts = {f"peer{k}_{name}": v for k, (_, p) in enumerate(losses) for name, v in p.items()}
            return torch.stack([l for l, _ in losses]).sum(), parts  # the sum: peer k's gradient comes from L_k alone

        return Update("peers", peers, loss)

    def phases(self, trainer, label="student"):
        peers = self.peers
        fixed = trainer.teacher(self.teacher, []) if self.teacher is not None else None
        if self.params.update == "sequential":
            updates = [self.sequential_update(k, fixed) for k in range(len(peers))]
        else:
            updates = [self.simultaneous_update(fixed)]
        evaluate = {f"peer{k}": peer for k, peer in enumerate(peers)}
        yield Phase("dml", updates, trainer.epochs, evaluate=evaluate)

    def fit(self, trainer, label="student"):
        trainer.run(self.phases(trainer, label))
        if self.params.export_peer == "best":
            scores = [trainer.val_accuracy(peer) for peer in self.peers]  # each peer holds its best epoch's weights
            self.exported_index.fill_(max(range(len(self.peers)), key=lambda k: scores[k]))
        else:
            self.exported_index.fill_(self.params.export_peer)
        return self.exported()

    def exported(self):
        return self.peers[int(self.exported_index)]
