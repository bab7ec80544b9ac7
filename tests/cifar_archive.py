"""A tiny CIFAR python archive in the original files' format: pickled dicts (protocol 2, bytes keys) whose b"data"
is an N×3072 uint8 array of row-major CHW images, in torchvision's folder layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _dump(value: dict, path: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump(value, handle, protocol=2)


def _batch(labels: dict[bytes, list[int]], rng: np.random.Generator) -> dict:
    count = len(next(iter(labels.values())))
    return {b"batch_label": b"a tiny batch", b"filenames": [b"img_%d.png" % i for i in range(count)],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), **labels}


def write_cifar100(root: Path, classes: int = 5, train_per_class: int = 10, test_per_class: int = 4,
                   seed: int = 0) -> Path:
    """root/cifar-100-python/{train, test, meta}; coarse label = fine label // 3. Returns root."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for c in range(classes) for _ in range(per_class)]
        _dump(_batch({b"fine_labels": fine, b"coarse_labels": [c // 3 for c in fine]}, rng), folder / name)
    _dump({b"fine_label_names": [b"class_%d" % c for c in range(classes)],
           b"coarse_label_names": [b"super_%d" % c for c in range((classes + 2) // 3)]}, folder / "meta")
    return root


def write_cifar10(root: Path, classes: int = 3, per_class_per_batch: int = 2, test_per_class: int = 3,
                  seed: int = 0) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}. Returns root."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, per_class in [(n, per_class_per_batch) for n in CIFAR10_FILES] + [("test_batch", test_per_class)]:
        _dump(_batch({b"labels": [c for c in range(classes) for _ in range(per_class)]}, rng), folder / name)
    _dump({b"label_names": [b"class_%d" % c for c in range(classes)], b"num_cases_per_batch": 6,
           b"num_vis": 3072}, folder / "batches.meta")
    return root


def read_batch(path: Path) -> dict:
    with path.open("rb") as handle:
        return pickle.load(handle, encoding="bytes")
