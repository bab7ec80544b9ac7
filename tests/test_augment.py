"""Training-batch augmentation: per-sample random parameters (kornia), reproducible from the loop's generator,
never on evaluation inputs, and normalization after it, the same on every split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import PIPELINES, cli
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.errors import InputError


@pytest.fixture
def same_image_npz(tmp_path):
    """64 copies of one 16×16 RGB image with a gradient, so every crop and flip of it is distinguishable."""
    ramp = np.add.outer(np.arange(16) * 3, np.arange(16) * 11).astype(np.uint8)
    image = np.stack([ramp, 255 - ramp, ramp // 2], axis=-1)  # H×W×C
    np.savez(tmp_path / "same.npz", x=np.repeat(image[None], 64, axis=0), y=np.arange(64) % 2)
    return tmp_path / "same.npz"


def load(path, augment, **changes):
    return load_data(data_config(source="npz", path=path, augment=augment, val_fraction=0.25, test_fraction=0.25,
                                **changes), seed=0)


def test_each_sample_of_a_batch_gets_its_own_crop(same_image_npz):
    splits = load(same_image_npz, [{"random_crop": {"padding": 4}}])
    assert splits.augmented
    _, x, _ = next(splits.train_batches(32, torch.Generator().manual_seed(0)))
    assert x.shape == (32, 3, 16, 16)
    distinct = {sample.numpy().tobytes() for sample in x}
    assert len(distinct) > 16  # 81 possible offsets; one shared crop would give 1
    # every output is a shifted copy of the image: its top-left corner is the image's pixel, or padding (zero)
    original = splits.x_train[0].float() / 255
    for sample in x[:8]:
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(sample[:, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)],
                                original[:, max(0, dy):16 - max(0, -dy), max(0, dx):16 - max(0, -dx)])]
        assert found, "an augmented sample is not a shifted copy of the image"


def test_flips_differ_per_sample_and_repeat_with_the_seed(same_image_npz):
    splits = load(same_image_npz, ["hflip"])
    original = splits.x_train[0].float() / 255

    def batch(seed):
        return next(splits.train_batches(32, torch.Generator().manual_seed(seed)))[1]

    x = batch(0)
    flipped = [torch.equal(s, original.flip(-1)) for s in x]
    assert all(f or torch.equal(s, original) for f, s in zip(flipped, x))
    assert 4 <= sum(flipped) <= 28  # p = 0.5 per sample
    assert torch.equal(batch(0), x) and not torch.equal(batch(1), x)


def test_evaluation_inputs_are_never_augmented_and_normalized_like_training(same_image_npz):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    splits = load(same_image_npz, [{"hflip": {"p": 1.0}}, {"color_jitter": {"brightness": 0.0}}],
                  normalize={"mean": mean, "std": std})
    assert splits.normalization == (mean, std)
    as_input = lambda x: (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # noqa: E731
    expected = as_input(splits.x_train[:1])
    for x in (splits.x_val, splits.x_test, next(splits.train_inputs(8))[1]):
        assert torch.allclose(x, expected.expand_as(x), atol=1e-6)
    # training batches: flipped (p = 1) before normalization, with the same statistics
    _, x, _ = next(splits.train_batches(16, torch.Generator().manual_seed(0)))
    assert torch.allclose(x, expected.flip(-1).expand_as(x), atol=1e-6)
    assert [c.shape for c in splits.calibration_inputs(2, 8, 0)] == [(8, 3, 16, 16)] * 2
    assert np.allclose(splits.calibration_inputs(1, 8, 0)[0], expected.numpy(), atol=1e-6)


def test_resized_crops_and_color_jitter_keep_the_size(same_image_npz):
    splits = load(same_image_npz, [{"random_resized_crop": {"scale": [0.3, 1.0]}},
                                   {"color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}}])
    _, x, _ = next(splits.train_batches(32, torch.Generator().manual_seed(0)))
    assert x.shape == (32, 3, 16, 16) and torch.isfinite(x).all()
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert len({s.numpy().tobytes() for s in x}) == 32


def test_augmentation_changes_the_fingerprint(same_image_npz):
    """A teacher trained on augmented batches is not the one trained on plain ones (teacher cache key)."""
    assert load(same_image_npz, []).fingerprint != load(same_image_npz, ["hflip"]).fingerprint


def test_augmentation_needs_images(tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.random.default_rng(0).random((40, 6)), y=np.arange(40) % 2)
    with pytest.raises(InputError) as err:
        load(tmp_path / "flat.npz", ["hflip"])
    assert err.value.key == "data.augment" and "needs images" in err.value.message


def test_hue_on_grey_images_is_refused(tmp_path):
    np.savez(tmp_path / "grey.npz", x=np.zeros((40, 8, 8), dtype=np.uint8), y=np.arange(40) % 2)
    with pytest.raises(InputError) as err:
        load(tmp_path / "grey.npz", ["hflip", {"color_jitter": {"hue": 0.1}}])
    assert err.value.key == "data.augment.1.color_jitter" and "3 channels" in err.value.message


@pytest.mark.parametrize("augment, key, fragment", [
    ([{"vflip": {}}], "data.augment.0.vflip", "valid keys here: random_crop, hflip, random_resized_crop, color_jitter"),
    ([{"hflip": {"p": 1.5}}], "data.augment.0.hflip.p", "≤ 1"),
    ([{"hflip": {}, "random_crop": {}}], "data.augment.0", "one augmentation per list item"),
    ([{"random_crop": {"padding": -1}}], "data.augment.0.random_crop.padding", "≥ 0"),
])
def test_bad_augmentation_keys(tmp_path, augment, key, fragment):
    raw = yaml.safe_load((PIPELINES / "digits.yaml").read_text())
    raw["data"]["augment"] = augment
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = cli("check", path)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"{path}: {key}: ") and fragment in line, line


def test_the_default_pipeline_accepts_augmentation_by_name(tmp_path):
    raw = yaml.safe_load((PIPELINES / "digits.yaml").read_text())
    raw["data"]["augment"] = ["hflip", {"random_crop": {"padding": 1}}, {"random_crop": None}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli("check", path).exit_code == 0
