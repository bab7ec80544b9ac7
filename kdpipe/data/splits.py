"""The training, validation and test splits as the training loop and the stages read them."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from kdpipe.data.augment import Augmentation, AugmentParams
from kdpipe.data.storage import StreamedImages


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices per class by `fractions` (the remainder is the last part), deterministically by seed.

    Each class is shuffled with its own generator derived from (seed, class), so
    adding samples of one class never reshuffles another.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        idx = idx[np.random.default_rng([seed, int(label)]).permutation(len(idx))]
        start = 0
        for i, frac in enumerate(fractions):
            count = int(round(frac * len(idx)))
            parts[i].append(idx[start:start + count])
            start += count
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, made once: a fresh copy to a CUDA device per batch would wait for it."""
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass(frozen=True)
class InputConversion:
    """Stored samples → model inputs: uint8 scaled to [0, 1], then normalized per channel when configured."""

    divisor: float | None = None  # 255 for uint8 images
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """Float samples, images in [0, 1] (what augmentation works on). Float storage passes through uncopied."""
        return x.float() if self.divisor is None else x.float() / self.divisor

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = _on_device(tuple(self.mean), x.dtype, x.device).view(shape)
        std = _on_device(tuple(self.std), x.dtype, x.device).view(shape)
        return (x - mean) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.unit(x))


@dataclass
class Splits:
    """Every split as stored: uint8 for 8-bit images (a quarter of float32's memory), float otherwise. x_train is
    None when streamed; the loop reads it through train_batches/train_inputs. stored_val and stored_test are read
    model-ready through x_val and x_test, and as they are by a uint8 graph (kdpipe.models.adapter.graph_inputs)."""

    x_train: torch.Tensor | None
    y_train: torch.Tensor
    stored_val: torch.Tensor
    y_val: torch.Tensor
    stored_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    fingerprint: str  # content hash of the data (or of its files' paths, sizes and times) and the split settings
    conversion: InputConversion = field(default_factory=InputConversion)
    augmentation: Augmentation | None = None
    stream: StreamedImages | None = None
    provenance: dict = field(default_factory=dict)  # where each split came from, its size, storage, skipped files
    # data.strong_augment: the steps making the second view of each image for the methods that read two (MLKD)
    strong_augmentation: Augmentation | None = None

    @property
    def x_val(self) -> torch.Tensor:
        """Model-ready float validation inputs, converted at each read (float storage passes through)."""
        return self.conversion(self.stored_val)

    @property
    def x_test(self) -> torch.Tensor:
        """Model-ready float test inputs, converted at each read (float storage passes through)."""
        return self.conversion(self.stored_test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape per sample (C, H, W for images); conversion keeps it."""
        return tuple(self.stored_val.shape[1:])

    @property
    def augmented(self) -> bool:
        """Whether training batches are randomly augmented (teacher outputs then differ every epoch)."""
        return self.augmentation is not None

    @property
    def normalization(self) -> tuple[list[float], list[float]] | None:
        """(mean, std) per channel applied to every split after scaling to [0, 1]; None when not normalized."""
        return None if self.conversion.mean is None else (list(self.conversion.mean), list(self.conversion.std))

    @property
    def stored_dtype(self) -> torch.dtype:
        """dtype of the stored training samples; uint8 ones are divided by 255 before normalization."""
        return torch.uint8 if self.stream is not None else self.x_train.dtype

    def to(self, device: torch.device) -> Splits:
        for augmentation in (self.augmentation, self.strong_augmentation):
            if augmentation is not None:
                augmentation.module.to(device)
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Splits(**moved)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples (e.g. x_train[index]) as model-ready float inputs, never augmented."""
        return self.conversion(x)

    def train_batches(self, batch_size: int, generator: torch.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(index, inputs, labels) of this rank's share of each batch of a fresh permutation of the training split.

        Every rank draws the same permutation from `generator`; a batch too small to give each rank two samples
        (BatchNorm cannot train on one) is skipped. Inputs are model-ready floats on the labels' device,
        augmented per sample when the pipeline says so (with parameters drawn from `generator` as well).
        """
        indices = self._epoch_indices(batch_size, generator, rank, world_size)
        for index, stored in zip(indices, self._stored(indices)):
            x = self.conversion.unit(stored)
            if self.augmentation is not None:
                x = self.augmentation(x, generator)
            yield index, self.conversion.normalize(x), self.y_train[index]

    def two_view_batches(self, batch_size: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(index, weak inputs, strong inputs, labels) as train_batches, with two views of the same images: the weak
        one through `augment`'s steps, the strong one through them again (drawn anew, as the reference's two
        transforms of one image each draw their own crop) and then through `strong_augment`'s."""
        indices = self._epoch_indices(batch_size, generator, rank, world_size)
        for index, stored in zip(indices, self._stored(indices)):
            images = self.conversion.unit(stored)
            weak, strong = (images if self.augmentation is None else self.augmentation(images, generator)
                            for _ in range(2))
            strong = self.strong_augmentation(strong, generator)
            yield index, self.conversion.normalize(weak), self.conversion.normalize(strong), self.y_train[index]

    def view_batches(self, batch_size: int, generator: torch.Generator, params: AugmentParams, views: int, *,
                     rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]]:
        """(index, view, inputs, labels) as train_batches, each image's input being one of its `views` recorded
        augmented views (chosen per epoch from `generator`), re-made from `params` (row: image · views + view)."""
        indices = self._epoch_indices(batch_size, generator, rank, world_size)
        chosen = torch.randint(views, (len(self.y_train),), generator=generator).to(self.y_train.device)
        for index, stored in zip(indices, self._stored(indices)):
            view = chosen[index]
            x = self.augmentation.replay(self.conversion.unit(stored), params.rows(index * views + view))
            yield index, view, self.conversion.normalize(x), self.y_train[index]

    def view_inputs(self, params: AugmentParams, views: int,
                    chunk_sizes: int | Iterable[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, inputs) over every recorded view in row order (image · views + view), in chunks of the sizes
        drawn from `chunk_sizes` one at a time: the teacher's view pass."""
        for row, stored in self._chunks(len(self.y_train) * views, chunk_sizes, views):
            yield row, self.conversion.normalize(self.augmentation.replay(self.conversion.unit(stored), params.rows(row)))

    def _epoch_indices(self, batch_size: int, generator: torch.Generator, rank: int, world_size: int) -> list[torch.Tensor]:
        """This rank's share of each batch of a fresh permutation drawn from `generator` (see train_batches)."""
        n = len(self.y_train)
        order = torch.randperm(n, generator=generator).to(self.y_train.device)
        indices = []
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2 * world_size and n >= 2 * world_size:
                continue
            indices.append(index[rank::world_size])
        return indices

    def train_inputs(self, chunk_sizes: int | Iterable[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(index, inputs) over the training split in order, never augmented, in chunks of the sizes drawn from
        `chunk_sizes` one at a time: for frozen-teacher passes."""
        for index, stored in self._chunks(len(self.y_train), chunk_sizes):
            yield index, self.to_input(stored)

    def _chunks(self, rows: int, chunk_sizes: int | Iterable[int], views: int = 1) -> Iterator[tuple[torch.Tensor,
                                                                                             torch.Tensor]]:
        """(rows, stored samples) over consecutive row ranges of 0 … rows−1 (row r: sample r // views), each range
        drawn from `chunk_sizes` when the previous one is done, so a pass that times its first chunks sees each
        chunk's whole cost (an int: every chunk that size); streamed data draws them all first, for the loader to
        decode ahead."""
        def ranges() -> Iterator[torch.Tensor]:
            if isinstance(chunk_sizes, int):
                yield from torch.arange(rows, device=self.y_train.device).split(chunk_sizes)
                return
            start = 0
            for size in chunk_sizes:
                yield torch.arange(start, start + size, device=self.y_train.device)
                start += size
            assert start == rows, f"chunks of {start} rows over {rows}"

        if self.stream is not None:
            chunks = list(ranges())
            yield from zip(chunks, self._stored([c // views for c in chunks]))
        else:
            for chunk in ranges():
                yield chunk, self.x_train[chunk // views]

    def calibration_inputs(self, count: int, batch_size: int, seed: int, stored: bool = False) -> list[np.ndarray]:
        """`count` batches of model-ready float32 inputs drawn without replacement from the training split (a fixed
        draw per seed), never augmented: for static INT8 calibration. `stored`: the same draw as stored (the 8-bit
        images a uint8 graph takes)."""
        order = np.random.default_rng(seed).permutation(len(self.y_train))[: batch_size * count]
        indices = [torch.from_numpy(order[i:i + batch_size]).to(self.y_train.device)
                   for i in range(0, len(order), batch_size)]
        return [np.ascontiguousarray((x if stored else self.to_input(x).float()).cpu().numpy())
                for x in self._stored(indices)]

    def _stored(self, indices: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The stored training samples of each batch of indices (on the labels' device, as the samples are)."""
        if self.stream is not None:
            yield from self.stream.batches(indices, self.y_train.device)
        else:
            for index in indices:
                yield self.x_train[index]
