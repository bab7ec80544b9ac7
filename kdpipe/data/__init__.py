"""Datasets: built-in digits, npz and csv files; deterministic stratified splits held as tensors.

Data that fits in memory lives on the training device as tensors, so a
training step is an index into them, with no DataLoader machinery.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdpipe.config import DataConfig
from kdpipe.errors import InputError
from kdpipe.fingerprint import fingerprint


@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    fingerprint: str  # content hash of the arrays and the split settings

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Splits:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Splits(**moved)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    @property
    def augmented(self) -> bool:
        """Whether training batches are randomly augmented (teacher outputs then differ every epoch)."""
        return False

    def train_batches(self, batch_size: int, generator: torch.Generator, *, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(index, inputs, labels) of this rank's share of each batch of a fresh permutation of the training split.

        Every rank draws the same permutation from `generator`; a batch too small to give each rank two samples
        (BatchNorm cannot train on one) is skipped. Inputs are ready for the model, on the data's device.
        """
        n = len(self.y_train)
        order = torch.randperm(n, generator=generator).to(self.y_train.device)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2 * world_size and n >= 2 * world_size:
                continue
            index = index[rank::world_size]
            yield index, self.x_train[index], self.y_train[index]

    def train_inputs(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(index, inputs) over the training split in order, never augmented: for frozen-teacher passes."""
        for start in range(0, len(self.y_train), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self.y_train)), device=self.y_train.device)
            yield index, self.x_train[index]


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


def load_data(cfg: DataConfig, seed: int) -> Splits:
    x, y, x_test, y_test = _read_source(cfg)
    if len(x) != len(y) or (x_test is not None and len(x_test) != len(y_test)):
        raise InputError("data.path", "expected as many labels as samples")
    x = _shape_samples(x, cfg, "data.path")
    y = _labels(y, "data.path")
    if x_test is not None:
        x_test = _shape_samples(x_test, cfg, "data.path")
        y_test = _labels(y_test, "data.path")
        if x_test.shape[1:] != x.shape[1:]:
            raise InputError("data.path", f"x_test samples have shape {x_test.shape[1:]}, x has {x.shape[1:]}")
        val_idx, train_idx = stratified_split(y, [cfg.val_fraction], seed)
        test = (x_test, y_test)
    else:
        test_idx, val_idx, train_idx = stratified_split(y, [cfg.test_fraction, cfg.val_fraction], seed)
        test = (x[test_idx], y[test_idx])
    all_labels = np.concatenate([y, test[1]])
    num_classes = cfg.num_classes or int(all_labels.max()) + 1
    if all_labels.max() >= num_classes:
        raise InputError("data.num_classes", f"labels go up to {int(all_labels.max())}, which needs more than {num_classes} classes")
    digest = fingerprint(x, y, test[0], test[1], [seed, cfg.val_fraction, cfg.test_fraction, num_classes])

    def tensors(xs, ys):
        return torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32)), torch.from_numpy(ys.astype(np.int64))

    x_tr, y_tr = tensors(x[train_idx], y[train_idx])
    x_va, y_va = tensors(x[val_idx], y[val_idx])
    x_te, y_te = tensors(*test)
    if min(len(y_tr), len(y_va), len(y_te)) == 0:
        raise InputError("data", f"too few samples ({len(y)}) to split into train, validation and test")
    return Splits(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes, digest)


def _read_source(cfg: DataConfig):
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 8×8 grey images with values 0..16, scaled to [0, 1].
        return digits.images[:, None, :, :] / 16.0, digits.target, None, None
    path = Path(cfg.path)
    if not path.is_file():
        raise InputError("data.path", f"data file not found: {path}")
    if cfg.source == "npz":
        return _read_npz(path)
    return _read_csv(path, cfg.label_column)


def _read_npz(path: Path):
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a file that is not an npz
        raise InputError("data.path", f"cannot read {path} as .npz: {exc}") from None
    missing = [k for k in ("x", "y") if k not in arrays.files]
    if missing:
        raise InputError("data.path", f"{path} has no array {' or '.join(repr(m) for m in missing)} (found: {', '.join(arrays.files) or 'none'}); expected 'x' and 'y', optionally 'x_test' and 'y_test'")
    has_test = "x_test" in arrays.files and "y_test" in arrays.files
    return (arrays["x"], arrays["y"], arrays["x_test"] if has_test else None, arrays["y_test"] if has_test else None)


def _read_csv(path: Path, label_column: str):
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise InputError("data.path", f"{path} is empty")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise InputError("data.label_column", f"no column '{label_column}' in {path} (columns: {', '.join(header)})")
    col = header.index(label_column)
    try:
        values = np.array([[float(v) for i, v in enumerate(r) if i != col] for r in body], dtype=np.float32)
        labels = np.array([float(r[col]) for r in body])
    except ValueError as exc:
        raise InputError("data.path", f"{path}: expected numeric feature and label values ({exc})") from None
    return values, labels, None, None


def _shape_samples(x: np.ndarray, cfg: DataConfig, key: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(key, f"expected numeric samples, got dtype {x.dtype}")
    if cfg.shape is not None:
        per_sample = int(np.prod(cfg.shape))
        if x[0].size != per_sample:
            raise InputError("data.shape", f"shape {cfg.shape} holds {per_sample} values but each sample has {x[0].size}")
        return x.reshape(len(x), *cfg.shape)
    if x.ndim == 3:  # N×H×W: one channel
        return x[:, None]
    if x.ndim in (2, 4):
        return x
    raise InputError(key, f"expected samples as N×D, N×H×W or N×C×H×W, got an array of shape {x.shape}")


def _labels(y: np.ndarray, key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(key, f"expected labels as a 1-d array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.equal(np.mod(y, 1), 0)) or (y < 0).any():
        raise InputError(key, "expected integer class labels ≥ 0")
    return y.astype(np.int64)
