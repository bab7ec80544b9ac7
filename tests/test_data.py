"""Data sources and the deterministic stratified split."""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.config import DataConfig
from kdpipe.data import load_data, stratified_split


def test_split_is_deterministic_by_seed_and_disjoint():
    a = load_data(DataConfig(), seed=3)
    b = load_data(DataConfig(), seed=3)
    c = load_data(DataConfig(), seed=4)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not torch.equal(a.y_train, c.y_train)
    sizes = a.sizes()
    assert sum(sizes.values()) == 1797
    flat = lambda x: {tuple(r) for r in x.flatten(1).tolist()}  # noqa: E731
    # digits has a few duplicate images; the splits are disjoint by index, so overlaps stay tiny
    assert len(flat(a.x_test) & flat(a.x_train)) < 5


def test_split_is_stratified():
    y = np.repeat(np.arange(5), [100, 40, 60, 200, 20])
    test, val, train = stratified_split(y, [0.2, 0.1], seed=0)
    assert len(set(test) | set(val) | set(train)) == len(y) == len(test) + len(val) + len(train)
    for label, count in zip(range(5), [100, 40, 60, 200, 20]):
        assert (y[test] == label).sum() == round(0.2 * count)
        assert (y[val] == label).sum() == round(0.1 * count)


def test_digits_are_images_scaled_to_unit_range():
    splits = load_data(DataConfig(), seed=0)
    assert splits.input_shape == (1, 8, 8)
    assert splits.num_classes == 10
    assert 0.0 <= splits.x_train.min() and splits.x_train.max() <= 1.0


def test_npz_with_own_test_split_and_flat_shape(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((90, 16)), y=np.arange(90) % 3,
             x_test=rng.random((30, 16)), y_test=np.arange(30) % 3)
    splits = load_data(DataConfig(source="npz", path=tmp_path / "d.npz", shape=[1, 4, 4], val_fraction=0.2), seed=0)
    assert splits.input_shape == (1, 4, 4)
    assert splits.sizes() == {"train": 72, "val": 18, "test": 30}
    assert splits.num_classes == 3


def test_csv_with_label_column(tmp_path):
    rows = ["f0,f1,target"] + [f"{i / 10},{(i % 4) / 3},{i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    splits = load_data(DataConfig(source="csv", path=tmp_path / "d.csv", label_column="target"), seed=0)
    assert splits.input_shape == (2,)
    assert splits.num_classes == 2
    assert sum(splits.sizes().values()) == 40
