"""Data-parallel training under `torchrun`: the process group, which rank does what, and small collectives.

`torchrun --nproc-per-node N -m kdpipe run FILE` starts N copies of the same
command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set.
Every rank runs the training stages (teacher, distill) on the same data and
takes its share of each batch; the Trainer averages each update's gradients
over the ranks with an all-reduce (no DistributedDataParallel wrapper) and,
after each epoch, gives every rank rank 0's BatchNorm statistics. A search
refuses to run under torchrun (`kdpipe search` workers share a study instead).
Rank 0 alone writes the run directory and talks to MLflow; the stages marked
`main_rank_only` (export, validate, register) run on rank 0 only, and the other
ranks end after training. Without those variables everything here is a no-op
for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = DistEnv()
_joined = 0  # process groups this process has joined (init), each under store keys of its own


def from_environment() -> DistEnv:
    """The ranks torchrun announced in the environment (one process when it did not)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> DistEnv:
    """Join the process group torchrun prepared: nccl for CUDA, gloo for CPU. Idempotent."""
    global _current, _joined
    env = from_environment()
    if env.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(minutes=30)
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        # torchrun's store outlives a process group: joined again after shutdown() (a second run in this process)
        # under the same keys, a rank reads the last group's addresses and fails to connect (pytorch#55967). Every
        # rank joins the same sequence of groups, so each group's prefix is the same on every rank.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(
            f"kdpipe/{_joined}", store), rank=env.rank, world_size=env.world_size, timeout=timeout)
        _joined += 1
    _current = env
    return env


def current() -> DistEnv:
    return _current


def shutdown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = DistEnv()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank, so that ranks take the same decisions."""
    if not _current.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks (in place and returned)."""
    if _current.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so all ranks hold the same model."""
    if _current.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if _current.enabled:
        dist.barrier()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order; the ranks' row counts may differ (a batch's
    shares differ by one sample), so rows are padded to the largest count for the collective and trimmed after."""
    if not _current.enabled:
        return tensor
    counts = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_counts = [torch.zeros_like(counts) for _ in range(_current.world_size)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c.item()) for c in all_counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:size] for g, size in zip(gathered, sizes)])
