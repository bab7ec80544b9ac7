"""Frozen-teacher outputs computed once and reused across epochs, trials and worker processes.

The teacher is frozen and un-augmented training inputs never change, so its logits and tapped features over
the training split are computed in one pass instead of one per step of every epoch. Entries are keyed by
content (kdpipe.fingerprint: the teacher's weights, the data's fingerprint, the taps and the autocast dtype),
in memory and, optionally, on disk where separate processes share them, verified (kdpipe.cache_store): a corrupt
entry is recomputed. Memory holds at most the budget, teacher outputs and teacher views (kdpipe.teacher_views)
together, least recently used entries leaving first; entries larger than the budget stay on disk, memory-mapped,
and each batch reads its rows from there.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kdpipe.cache_store import lookup, store, warn_stderr
from kdpipe.fingerprint import fingerprint
from kdpipe.inference import predict
from kdpipe.taps import Outputs

# On CPU: the batch sizes a full pass tries on its first chunks, each twice (a shape's first forward pays one-time
# costs), before it runs the rest at the one that cost least per row.
CPU_PASS_BATCHES = (32, 64, 128, 256, 512)
STREAMED_PASS_BATCH = 512  # on CPU over streamed images: the loader decodes ahead, out of a probe's sight
CUDA_PASS_BATCH = 4096  # on CUDA: the first batch tried, halved until the pass fits in the device's memory

T = TypeVar("T")


def largest_batch(fn: Callable[[int], T], start: int) -> tuple[T, int]:
    """(fn(batch), batch) for the largest batch of start, start/2, start/4, … 1 at which fn does not run out of
    device memory (torch.OutOfMemoryError); the error itself when even a batch of 1 does not fit."""
    batch = start
    while True:
        try:
            return fn(batch), batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        batch //= 2  # outside the handler: the failed attempt's tensors are freed before the next one


# The most of a pass its probe may take: a short pass (a few epochs' views of a small split) spent most of its rows at
# the probe's larger, slower sizes (1984 of 2560 rows), and cost 1.26× the online teacher per view.
PROBE_SHARE = 1 / 3


class ProbedBatches:
    """The chunk sizes of one pass over `rows` rows, drawn lazily by the pass itself: the first chunks try each of
    `candidates` twice, in order, while the probe stays within PROBE_SHARE of the rows (the first candidate always),
    timed from one draw to the next (the chunk's inputs and its forward), and the rest run at the candidate whose
    second chunk cost least per row. Every chunk is a real part of the pass, so the probe costs no forward of its
    own."""

    def __init__(self, rows: int, candidates: tuple[int, ...] = CPU_PASS_BATCHES):
        self.rows = rows
        self.candidates = candidates
        self.seconds_per_row: dict[int, float] = {}  # each candidate's measured cost, where it had a whole chunk
        self.batch: int | None = None  # the chosen size, once the probe is over

    def __iter__(self) -> Iterator[int]:
        left = self.rows
        probed = 0
        for size in self.candidates:
            if probed and probed + 2 * size > PROBE_SHARE * self.rows:
                break
            probed += 2 * size
            for repeat in range(2):
                if left == 0:
                    return
                chunk = min(size, left)
                start = time.perf_counter()
                yield chunk
                if repeat == 1 and chunk == size:
                    self.seconds_per_row[size] = (time.perf_counter() - start) / size
                left -= chunk
        if not left:
            return
        self.batch = min(self.seconds_per_row, key=self.seconds_per_row.__getitem__)
        while left:
            chunk = min(self.batch, left)
            yield chunk
            left -= chunk


@dataclass
class PassBatch:
    """How a full pass was batched (report.json): `batch`, the rows per forward after the probe (None: the pass
    ended within it); `probed`, the seconds per row each probed size cost; `rows` and `seconds`, the whole pass."""

    rows: int
    seconds: float
    batch: int | None
    probed: dict[int, float]

    def report(self) -> dict[str, Any]:
        return {"rows": self.rows, "seconds": round(self.seconds, 4),
                "ms_per_row": round(self.seconds / self.rows * 1e3, 4), "batch": self.batch,
                "probed_ms_per_row": {str(b): round(s * 1e3, 4) for b, s in self.probed.items()}}


def full_pass(rows: int, device: torch.device, forward: Callable[[int | Iterable[int]], T],
              streamed: bool = False) -> tuple[T, PassBatch]:
    """`forward(chunk_sizes)` over `rows` rows of one pass of the frozen teacher, chunk_sizes being one batch size
    for every chunk or the sizes in turn: on CUDA at the largest batch that fits (from CUDA_PASS_BATCH down); on CPU
    at the batch a probe on the pass's first chunks measures fastest (ProbedBatches), or STREAMED_PASS_BATCH over
    `streamed` images."""
    start = time.perf_counter()
    if device.type == "cuda" or streamed:
        first = max(1, min(CUDA_PASS_BATCH, rows)) if device.type == "cuda" else STREAMED_PASS_BATCH
        result, batch = largest_batch(forward, first)
        return result, PassBatch(rows, time.perf_counter() - start, batch, {})
    sizes = ProbedBatches(rows)
    result = forward(sizes)
    return result, PassBatch(rows, time.perf_counter() - start, sizes.batch, sizes.seconds_per_row)


@dataclass
class SpilledOutputs(Outputs):
    """Outputs memory-mapped from the disk cache; a selection is read from disk and moved to `device`."""

    device: torch.device = torch.device("cpu")

    def select(self, index: torch.Tensor) -> Outputs:
        return Outputs(self.logits[index.cpu()].to(self.device),
                       {k: v[index.cpu()].to(self.device) for k, v in self.features.items()})


def nbytes(outputs: Outputs) -> int:
    return sum(t.numel() * t.element_size() for t in (outputs.logits, *outputs.features.values()))


def freeze(teacher: nn.Module) -> None:
    for p in teacher.parameters():
        p.requires_grad_(False)


def teacher_pass(teacher: nn.Module, x: torch.Tensor, taps: list[str], autocast: torch.dtype | None = None,
                 channels_last: bool = False) -> Outputs:
    """The frozen teacher's eval-mode outputs on `x` (no grad; under autocast when a dtype is given), as float32."""
    freeze(teacher)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    context = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        outputs = predict(teacher, x, batch_size=max(1, len(x)), taps=taps)  # one forward: the caller sized x
    return Outputs(outputs.logits.float(), {k: v.float() for k, v in outputs.features.items()})


class TeacherOutputCache:
    def __init__(self, directory: Path | None = None, memory_budget_mb: float | None = None):
        """`directory`: disk cache shared by processes (None: memory only, spilling to a private temporary
        directory). `memory_budget_mb`: the most teacher outputs held in memory (None: no limit)."""
        self.directory = Path(directory) if directory else None
        self.memory_budget = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
        # Teacher outputs and teacher views (kdpipe.teacher_views) by content key, least recently used first, and
        # the bytes each holds against the budget (0: memory-mapped from disk).
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._resident: dict[str, int] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.forward_passes = 0  # full teacher passes over a training split: tests and benchmarks count them
        self.spilled = 0  # entries kept on disk because they exceeded the memory budget
        self.view_passes = 0  # teacher passes over recorded augmented views: tests and benchmarks count them
        self.last_pass: PassBatch | None = None  # how the last lookup's pass was batched (None: it found its entry)

    def key(self, teacher: nn.Module, data_fingerprint: str, taps: list[str], autocast: torch.dtype | None) -> str:
        return fingerprint(teacher, data_fingerprint, sorted(taps), str(autocast))

    def get(self, teacher: nn.Module, data, taps: list[str], autocast: torch.dtype | None = None,
            channels_last: bool = False) -> Outputs:
        """The teacher's outputs over `data`'s (un-augmented) training split, a kdpipe.data.Splits."""
        key = self.key(teacher, data.fingerprint, taps, autocast)
        device = data.y_train.device
        self.last_pass = None
        if (held := self.recall(key)) is not None:
            return held
        path = self.directory / f"{key}.pt" if self.directory is not None else None
        outputs = self._load(path, device) if path is not None else None
        if outputs is None:
            outputs = self._compute(teacher, data, taps, autocast, channels_last)
            if path is not None:
                self._save(outputs, path)
        if not self.fits(nbytes(outputs)):
            outputs = self._spill(outputs, path, device)
            self.hold(key, outputs, 0)
        else:
            if isinstance(outputs, SpilledOutputs):  # fits after all: bring it into memory
                outputs = Outputs(outputs.logits.to(device), {k: v.to(device) for k, v in outputs.features.items()})
            self.hold(key, outputs, nbytes(outputs))
        return outputs

    def fits(self, size: int) -> bool:
        """Whether an entry of `size` bytes may be held in memory at all (else it stays memory-mapped on disk)."""
        return self.memory_budget is None or size <= self.memory_budget

    def recall(self, key: str) -> Any:
        """The entry held in memory under `key`, now the most recently used, or None."""
        if key not in self._memory:
            return None
        self._memory.move_to_end(key)
        return self._memory[key]

    def hold(self, key: str, entry: Any, resident_bytes: int) -> None:
        """Keep `entry` in memory under `key`; its `resident_bytes` (0 for a memory-mapped entry) count against the
        budget, so least recently used entries leave first to make room."""
        if self.memory_budget is not None:
            used = sum(self._resident.values())
            for k in [k for k, size in self._resident.items() if size]:
                if used + resident_bytes <= self.memory_budget:
                    break
                used -= self._resident.pop(k)
                del self._memory[k]
        self._memory[key] = entry
        self._resident[key] = resident_bytes

    def _compute(self, teacher, data, taps, autocast, channels_last) -> Outputs:
        self.forward_passes += 1

        def forward(sizes: int | Iterable[int]) -> Outputs:
            chunks = [teacher_pass(teacher, x, taps, autocast, channels_last) for _, x in data.train_inputs(sizes)]
            return Outputs(torch.cat([c.logits for c in chunks]),
                           {k: torch.cat([c.features[k] for c in chunks]) for k in taps})

        outputs, self.last_pass = full_pass(len(data.y_train), data.y_train.device, forward, data.stream is not None)
        return outputs

    def _spill(self, outputs: Outputs, path: Path | None, device: torch.device) -> SpilledOutputs:
        if isinstance(outputs, SpilledOutputs):
            return outputs
        if path is None:
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="kdpipe-teacher-")
            path = Path(self._scratch.name) / f"{self.spilled}.pt"
            self._save(outputs, path)
        self.spilled += 1
        return self._load(path, device)

    @staticmethod
    def _save(outputs: Outputs, path: Path) -> None:
        state = {"logits": outputs.logits.cpu(), "features": {k: v.cpu() for k, v in outputs.features.items()}}
        store(path, lambda tmp: torch.save(state, tmp))

    @staticmethod
    def _load(path: Path, device: torch.device) -> SpilledOutputs | None:
        """Memory-mapped: pages are read when batches touch them. None when absent or corrupt (removed: recompute)."""
        if not lookup(path, warn_stderr):
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return SpilledOutputs(stored["logits"], stored["features"], device)
