"""Where decoded images live: all in memory as uint8 (decoded once by worker processes), or streamed.

Streaming decodes the training images in DataLoader workers every epoch,
into pinned memory, a few batches ahead of the training step, so a data set
larger than memory trains at the speed the workers decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdpipe.data.images import Decoder, DecodeError
from kdpipe.data.sources import ImageRecords
from kdpipe.errors import InputError

DECODE_BATCH = 64
# A data set is held in memory when it needs at most this share of the memory free on the host (and the device).
MEMORY_SHARE = 0.5


def worker_count(setting: str | int) -> int:
    return min(8, os.cpu_count() or 1) if setting == "auto" else int(setting)


def available_bytes(device: torch.device | None) -> int:
    """Memory free for the data: the host's available memory, and the device's free memory on CUDA."""
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:  # MemAvailable counts reclaimable page cache, unlike AVPHYS_PAGES
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    if device is not None and device.type == "cuda":
        free = min(free, torch.cuda.mem_get_info(device)[0])
    return free


def choose_storage(setting: str, samples: int, sample_shape: tuple[int, ...], device: torch.device | None) -> str:
    if setting != "auto":
        return setting
    needed = samples * int(np.prod(sample_shape))  # uint8
    return "memory" if needed <= MEMORY_SHARE * available_bytes(device) else "stream"


class _Decoding(Dataset):
    """Decodes record i, or with `check_only` checks that it would decode (None); a failure comes back as a value
    (DataLoader workers would wrap a raised error)."""

    def __init__(self, records: ImageRecords, decoder: Decoder, shape: tuple[int, ...], check_only: bool = False):
        self.records, self.decoder, self.shape, self.check_only = records, decoder, shape, check_only

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> np.ndarray | str | None:
        name, raw = self.records.name(i), self.records.raw(i)
        try:
            if self.check_only:
                image, shape = None, self.decoder.checked_shape(raw, name)
            else:
                image = self.decoder(raw, name)
                shape = image.shape
        except DecodeError as exc:
            return str(exc)
        if shape != self.shape:
            return (f"{name}: the image is {shape[1]}×{shape[2]}, others are {self.shape[1]}×{self.shape[2]}; "
                    f"set data.image_size to resize every image to one size")
        return image


def _stack(items: list[np.ndarray | str]) -> tuple[torch.Tensor | None, str | None]:
    error = next((item for item in items if isinstance(item, str)), None)
    return (None, error) if error else (torch.from_numpy(np.stack(items)), None)


def _checked(batch: tuple[torch.Tensor | None, str | None]) -> torch.Tensor:
    images, error = batch
    if error is not None:
        raise InputError("data.path", error)
    return images


def _first_error(items: list[str | None]) -> str | None:
    return next((item for item in items if item is not None), None)


def check_all(records: ImageRecords, decoder: Decoder, workers: int, shape: tuple[int, ...]) -> None:
    """Every record checked by `workers` processes to decode to `shape` (Decoder.checked_shape: cheaper than
    decoding), so an image that streaming would fail on mid-run is named before the run starts."""
    loader = DataLoader(_Decoding(records, decoder, shape, check_only=True), batch_size=DECODE_BATCH,
                        num_workers=workers, collate_fn=_first_error)
    error = next((error for error in loader if error is not None), None)
    if error is not None:
        raise InputError("data.path", error)


def first_image(records: ImageRecords, decoder: Decoder) -> np.ndarray:
    """The first record decoded in this process: the shape every other image must have."""
    try:
        return decoder(records.raw(0), records.name(0))
    except DecodeError as exc:
        raise InputError("data.path", str(exc)) from None


class _Chain(Dataset):
    """Several record sets as one, so one pool of workers decodes them all."""

    def __init__(self, parts: list[_Decoding]):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> np.ndarray | str:
        part = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[part][i - (int(self.ends[part - 1]) if part else 0)]


def decode_all(record_sets: list[ImageRecords], decoder: Decoder, workers: int,
               shape: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """Every record of each set decoded once, by one pool of `workers` processes, into uint8 N×C×H×W arrays.
    `shape`: the shape every image must have; default: the first image's."""
    shape = shape or first_image(record_sets[0], decoder).shape
    chain = _Chain([_Decoding(records, decoder, shape) for records in record_sets])
    images = np.empty((len(chain), *shape), dtype=np.uint8)
    loader = DataLoader(chain, batch_size=DECODE_BATCH, num_workers=workers, collate_fn=_stack)
    for start, batch in zip(range(0, len(chain), DECODE_BATCH), loader):
        images[start:start + DECODE_BATCH] = _checked(batch).numpy()
    return np.split(images, chain.ends[:-1])


class _EpochBatches:
    """The batch sampler of a persistent loader: the batches of the coming pass, set before each pass."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamedImages:
    """Training images decoded by DataLoader workers on every pass, pinned and prefetched."""

    def __init__(self, records: ImageRecords, decoder: Decoder, shape: tuple[int, ...], workers: int,
                 prefetch_factor: int = 4):
        self.records, self.decoder, self.shape = records, decoder, shape
        self.workers, self.prefetch_factor = workers, prefetch_factor
        self._sampler = _EpochBatches()
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.records)

    def batches(self, index_batches: list[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
        """uint8 images of each batch of training indices, on `device`, in the order given."""
        if self._loader is None:
            workers = self.workers
            self._loader = DataLoader(_Decoding(self.records, self.decoder, self.shape), batch_sampler=self._sampler,
                                      num_workers=workers, collate_fn=_stack, pin_memory=device.type == "cuda",
                                      persistent_workers=workers > 0,
                                      prefetch_factor=self.prefetch_factor if workers > 0 else None)
        self._sampler.batches = [b.tolist() for b in index_batches]
        for batch in self._loader:
            yield _checked(batch).to(device, non_blocking=True)
