"""Data sources and the deterministic stratified split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.data.sources import data_config
from kdpipe.data import load_data, stratified_split
from kdpipe.errors import InputError


def test_split_is_deterministic_by_seed_and_disjoint():
    a = load_data(data_config(), seed=3)
    b = load_data(data_config(), seed=3)
    c = load_data(data_config(), seed=4)
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
    splits = load_data(data_config(), seed=0)
    assert splits.input_shape == (1, 8, 8)
    assert splits.num_classes == 10
    assert 0.0 <= splits.x_train.min() and splits.x_train.max() <= 1.0


def test_npz_with_own_test_split_and_flat_shape(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((90, 16)), y=np.arange(90) % 3,
             x_test=rng.random((30, 16)), y_test=np.arange(30) % 3)
    splits = load_data(data_config(source="npz", path=tmp_path / "d.npz", shape=[1, 4, 4], val_fraction=0.2), seed=0)
    assert splits.input_shape == (1, 4, 4)
    assert splits.sizes() == {"train": 72, "val": 18, "test": 30}
    assert splits.num_classes == 3


def test_csv_with_label_column(tmp_path):
    rows = ["f0,f1,target"] + [f"{i / 10},{(i % 4) / 3},{i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    splits = load_data(data_config(source="csv", path=tmp_path / "d.csv", label_column="target"), seed=0)
    assert splits.input_shape == (2,)
    assert splits.num_classes == 2
    assert sum(splits.sizes().values()) == 40


# --- array layouts, given splits and label checks ---------------------------------------------------------------


def images_nhwc(n: int, height: int = 6, width: int = 5, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)


def test_uint8_nhwc_npz_is_stored_uint8_and_read_as_channels_first(tmp_path):
    x = images_nhwc(60)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3)
    splits = load_data(data_config(source="npz", path=tmp_path / "d.npz"), seed=0)
    assert splits.input_shape == (3, 6, 5)
    assert splits.x_train.dtype == torch.uint8 and splits.stored_dtype == torch.uint8
    assert splits.x_train.nbytes * 4 == splits.x_train.numel() * torch.float32.itemsize  # a quarter of float32
    # val inputs are the images, channels first, scaled to [0, 1]
    expected = {im.transpose(2, 0, 1).tobytes() for im in x}
    assert all(np.rint(v.numpy() * 255).astype(np.uint8).tobytes() in expected for v in splits.x_val)
    assert 0.0 <= splits.x_val.min() and splits.x_val.max() <= 1.0 and splits.x_val.max() > 0.9
    first_index, first_x, _ = next(splits.train_batches(4, torch.Generator().manual_seed(0)))
    assert torch.equal(first_x, splits.x_train[first_index].float() / 255)


def test_float_nhwc_is_detected_and_ambiguous_shapes_are_refused(tmp_path):
    np.savez(tmp_path / "nhwc.npz", x=np.random.default_rng(0).random((40, 32, 32, 3)), y=np.arange(40) % 2)
    assert load_data(data_config(source="npz", path=tmp_path / "nhwc.npz"), seed=0).input_shape == (3, 32, 32)
    np.savez(tmp_path / "ambiguous.npz", x=np.zeros((40, 3, 7, 3), dtype=np.float32), y=np.arange(40) % 2)
    with pytest.raises(InputError) as err:
        load_data(data_config(source="npz", path=tmp_path / "ambiguous.npz"), seed=0)
    assert err.value.key == "data.layout" and "set layout to nchw or nhwc" in err.value.message
    given = data_config(source="npz", path=tmp_path / "ambiguous.npz", layout="nhwc")
    assert load_data(given, seed=0).input_shape == (3, 3, 7)


def test_channels_converts_array_images(tmp_path):
    np.savez(tmp_path / "d.npz", x=images_nhwc(40), y=np.arange(40) % 2)
    grey = load_data(data_config(source="npz", path=tmp_path / "d.npz", channels=1), seed=0)
    assert grey.input_shape == (1, 6, 5) and grey.stored_dtype == torch.uint8


def test_npz_validation_split_is_used_as_given(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((80, 16)), y=np.arange(80) % 4, x_val=rng.random((12, 16)),
             y_val=np.arange(12) % 4)
    splits = load_data(data_config(source="npz", path=tmp_path / "d.npz", test_fraction=0.25), seed=0)
    assert splits.sizes() == {"train": 60, "val": 12, "test": 20}
    assert np.allclose(splits.x_val.numpy(), np.load(tmp_path / "d.npz")["x_val"])
    assert splits.provenance["splits"]["val"] == {"from": f"{tmp_path / 'd.npz'} x_val, y_val", "size": 12}
    assert "test_fraction 0.25" in splits.provenance["splits"]["test"]["from"]
    with pytest.raises(InputError) as err:
        load_data(data_config(source="npz", path=tmp_path / "d.npz", val_fraction=0.1), seed=0)
    assert err.value.key == "data.val_fraction" and "would be ignored" in err.value.message


def test_csv_split_column(tmp_path):
    rows = ["f0,f1,label,split"] + [f"{i / 10},{i % 3},{i % 2},{('train', 'train', 'val', 'test')[i % 4]}"
                                     for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    splits = load_data(data_config(source="csv", path=tmp_path / "d.csv", split_column="split"), seed=0)
    assert splits.sizes() == {"train": 20, "val": 10, "test": 10} and splits.input_shape == (2,)
    (tmp_path / "bad.csv").write_text("f0,label,split\n1,0,train\n2,1,holdout\n")
    with pytest.raises(InputError, match="holds 'holdout'; expected train, val or test"):
        load_data(data_config(source="csv", path=tmp_path / "bad.csv", split_column="split"), seed=0)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_samples_are_an_input_error(tmp_path, value):
    x = np.random.default_rng(0).random((40, 4))
    x[7, 2] = value
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 2)
    with pytest.raises(InputError, match="1 non-finite values"):
        load_data(data_config(source="npz", path=tmp_path / "d.npz"), seed=0)


def test_sparse_labels_need_num_classes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((100, 4)), y=(np.arange(100) % 10) * 100)
    with pytest.raises(InputError) as err:
        load_data(data_config(source="npz", path=tmp_path / "d.npz"), seed=0)
    assert err.value.key == "data.num_classes" and "labels go up to 900 but 891 of 0..900 never occur" in err.value.message
    assert load_data(data_config(source="npz", path=tmp_path / "d.npz", num_classes=901), seed=0).num_classes == 901


def test_single_class_data_is_an_input_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((40, 4)), y=np.zeros(40))
    with pytest.raises(InputError, match="single class"):
        load_data(data_config(source="npz", path=tmp_path / "d.npz", num_classes=2), seed=0)


def test_digits_stay_float_and_unconverted():
    """The default pipeline's fast path: float storage, inputs are the stored tensor rows themselves."""
    splits = load_data(data_config(), seed=0)
    assert splits.stored_dtype == torch.float32 and splits.normalization is None and not splits.augmented
    index, x, _ = next(splits.train_batches(64, torch.Generator().manual_seed(0)))
    assert torch.equal(x, splits.x_train[index])
    assert splits.to_input(splits.x_train) is splits.x_train  # no copy


def test_too_few_samples_to_split(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((4, 3)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match="too few samples"):
        load_data(data_config(source="npz", path=tmp_path / "d.npz"), seed=0)


def test_digits_are_scikit_learns_read_without_importing_it():
    """The digits source reads the table scikit-learn ships: the same arrays (values and dtypes) as load_digits,
    without the two seconds of start-up that importing scikit-learn costs every run."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from kdpipe.data.sources import read_source

    part = read_source(data_config()).parts["all"]
    digits = load_digits()
    expected = digits.images[:, None, :, :] / 16.0
    assert part.x.dtype == expected.dtype and part.y.dtype == digits.target.dtype
    assert np.array_equal(part.x, expected) and np.array_equal(part.y, digits.target)
    imported = subprocess.run([sys.executable, "-c", "import sys; from kdpipe.data.sources import data_config, "
                               "read_source; read_source(data_config()); print('sklearn' in sys.modules)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert imported == "False"
