"""Strong augmentation (issue 20): the randaugment and cutout steps, usable in data.augment by any method and in
data.strong_augment, the second view of each image that two-view methods (MLKD) read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets, write_pipeline
from kdpipe.config_data import CutoutSettings
from kdpipe.data import load_data
from kdpipe.data.augment import Augmentation
from kdpipe.data.sources import data_config
from kdpipe.data.strong import CUTOUT_FILL_GRAY, CUTOUT_FILL_RGB, FIXMATCH_OPS, Cutout, RandAugment, cutout


def steps(*written):
    return data_config(augment=list(written)).augment


def textured(count: int = 16, channels: int = 3, side: int = 32) -> torch.Tensor:
    return torch.rand(count, channels, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("step", [{"randaugment": {}}, "cutout", {"randaugment": {"ops": 3}}])
@pytest.mark.parametrize("channels", [1, 3])
def test_steps_keep_shape_and_dtype_repeat_with_the_seed_and_change_the_images(step, channels):
    augmentation = Augmentation(steps(step), (channels, 32, 32))
    x = textured(channels=channels)
    out = augmentation(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, augmentation(x, torch.Generator().manual_seed(0)))  # same generator, same images
    assert not torch.equal(out, augmentation(x, torch.Generator().manual_seed(1)))
    changed = [not torch.equal(a, b) for a, b in zip(out, x)]
    assert sum(changed) >= len(x) // 2  # identity draws and tiny cutouts may leave a few images as they were


def test_every_randaugment_op_keeps_the_range_and_changes_a_textured_image():
    x = textured(4)
    for op in FIXMATCH_OPS:
        for level in (0.0, 0.5, 0.99):
            out = op.apply(x, op.magnitude(torch.full((4,), level)))
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, op.name
        if op.name != "identity":  # at one end of its range at least (posterize's 8 bits, solarize's 256 keep x)
            assert any(not torch.equal(op.apply(x, op.magnitude(torch.full((4,), level))), x)
                       for level in (0.0, 0.99)), op.name


def test_randaugment_magnitudes_span_the_fixmatch_ranges():
    ranges = {op.name: (op.magnitude(torch.tensor([0.0])).item(), op.magnitude(torch.tensor([0.9999])).item())
              for op in FIXMATCH_OPS}
    assert len(FIXMATCH_OPS) == 14
    assert ranges["brightness"] == pytest.approx((0.05, 0.95), abs=1e-3)
    assert ranges["rotate"] == pytest.approx((-30.0, 30.0), abs=1e-2)
    assert ranges["shear_x"] == pytest.approx((-0.3, 0.3), abs=1e-3)
    assert ranges["solarize"] == pytest.approx((0.0, 256.0), abs=0.1)
    assert ranges["posterize"] == (4.0, 8.0)  # integer bits 4..8


def test_randaugment_applies_the_drawn_ops_in_turn():
    """Two brightness ops at known levels multiply the image by both factors (PIL's blend with black)."""
    x = textured(2)
    brightness = [op.name for op in FIXMATCH_OPS].index("brightness")
    params = {"op": torch.full((2, 2), brightness), "level": torch.tensor([[0.0, 1.0], [0.5, 0.5]])}
    out = RandAugment(data_config(augment=["randaugment"]).augment[0].params)(x, params)
    torch.testing.assert_close(out[0], (x[0] * 0.05 * 0.95).clamp(0, 1))
    torch.testing.assert_close(out[1], x[1] * 0.5 * 0.5)


def test_cutout_fills_a_square_of_the_drawn_side_with_the_colour():
    x = textured(3)
    centre = torch.tensor([[16.0, 16.0], [10.0, 20.0], [2.0, 30.0]])
    side = torch.tensor([8.0, 5.0, 8.0])
    fill = torch.tensor(CUTOUT_FILL_RGB) / 255
    out = cutout(x, centre, side, fill)
    painted = (out == fill.view(1, 3, 1, 1)).all(1)
    assert painted[0].sum() == 64 and painted[0, 12:20, 12:20].all()
    assert painted[1].sum() == 25 and painted[1, 7:12, 17:22].all()  # ⌊10 − 2.5⌋ = 7 .. ⌊7 + 5⌋ = 12
    assert painted[2].sum() == 8 * 6 and painted[2, 0:8, 26:32].all()  # clipped by the right border, as FixMatch
    keep = ~painted.unsqueeze(1).expand_as(x)
    assert torch.equal(out[keep], x[keep])


def test_cutout_fill_defaults_to_mlkds_colour_or_its_gray_and_can_be_set():
    settings = CutoutSettings()
    one = Cutout(settings, (8, 8))
    for channels, expected in ((3, CUTOUT_FILL_RGB), (1, CUTOUT_FILL_GRAY)):
        x = torch.rand(1, channels, 8, 8)
        out = one(x, {"centre": torch.tensor([[4.0, 4.0]]), "side": torch.tensor([4.0])})
        torch.testing.assert_close(out[0, :, 4, 4], torch.tensor(expected) / 255)
    assert CUTOUT_FILL_GRAY[0] == pytest.approx(122.57, abs=0.01)
    custom = Cutout(CutoutSettings(fill=[255.0]), (8, 8))
    out = custom(torch.zeros(1, 1, 8, 8), {"centre": torch.tensor([[4.0, 4.0]]), "side": torch.tensor([2.0])})
    assert out.sum() == 4


def test_cutout_sides_are_uniform_up_to_the_fraction_of_the_side():
    drawn = Cutout(CutoutSettings(max_fraction=0.5), (32, 32)).forward_parameters(torch.Size((4000, 3, 32, 32)))
    assert drawn["side"].min() >= 0 and drawn["side"].max() <= 16
    assert drawn["side"].mean().item() == pytest.approx(8.0, abs=0.3)


def test_strong_steps_replay_for_teacher_views():
    """Recorded parameters remake the same images, any rows of a draw in any batch (kdpipe.teacher_views)."""
    augmentation = Augmentation(steps("randaugment", "cutout"), (3, 16, 16))
    x = textured(8, side=16)
    params = augmentation.draw(8, torch.Generator().manual_seed(3))
    whole = augmentation.replay(x, params)
    assert not torch.equal(whole, x)
    rows = torch.tensor([5, 2])
    assert torch.equal(augmentation.replay(x[rows], params.rows(rows)), whole[rows])


@pytest.mark.slow
def test_kd_with_strong_steps_in_augment_learns_from_teacher_views(workdir):
    """Any method can use the steps in data.augment; a soft-label method's teacher views record and replay them."""
    pipeline = write_pipeline(workdir / "kd.yaml", **{"data.augment": ["randaugment", "cutout"]})
    result = cli("run", pipeline, "--until", "distill", *sets(*FAST, *LENIENT, "distill.epochs=1",
                                                              "distill.teacher_views=2"))
    assert result.exit_code == 0, result.output
    assert read_report(result.stdout)["distill"]["teacher_mode"] == "views"


def test_two_views_share_the_images_and_labels_and_differ():
    splits = load_data(data_config(augment=[{"random_crop": {"padding": 1}}], strong_augment=["randaugment", "cutout"]),
                       0)
    generator = torch.Generator().manual_seed(0)
    index, weak, strong, y = next(splits.two_view_batches(32, generator))
    reference = next(splits.train_batches(32, torch.Generator().manual_seed(0)))
    assert torch.equal(index, reference[0]) and torch.equal(y, reference[2])  # the same images, same labels
    assert torch.equal(y, splits.y_train[index])
    assert weak.shape == strong.shape == (32, 1, 8, 8)
    assert sum(not torch.equal(a, b) for a, b in zip(weak, strong)) >= 24
    again = next(splits.two_view_batches(32, torch.Generator().manual_seed(0)))
    assert torch.equal(again[1], weak) and torch.equal(again[2], strong)


def test_two_views_without_weak_steps_keep_the_weak_view_as_stored():
    splits = load_data(data_config(strong_augment=["cutout"]), 0)
    index, weak, strong, _ = next(splits.two_view_batches(16, torch.Generator().manual_seed(0)))
    assert torch.equal(weak, splits.to_input(splits.x_train[index]))
    assert not splits.augmented  # the single view training reads is the stored image


@pytest.mark.parametrize("override, key", [
    ("data.strong_augment=[{randaugment: {ops: 0}}]", "data.strong_augment.0.randaugment.ops"),
    ("data.strong_augment=[{cutout: {max_fraction: 0}}]", "data.strong_augment.0.cutout.max_fraction"),
    ("data.strong_augment=[{cutout: {fill: [300]}}]", "data.strong_augment.0.cutout.fill.0"),
    ("data.strong_augment=[{cutout: {fill: [1, 2, 3]}}]", "data.strong_augment.0.cutout.fill"),
    ("data.augment=[{randaugment: {op: 2}}]", "data.augment.0.randaugment.op"),
    ("data.strong_augment=[]", "data.strong_augment"),  # mlkd needs strong steps
])
def test_bad_strong_step_settings_exit_2_in_one_line_naming_the_key(workdir, override, key):
    result = cli("check", PIPELINES / "mlkd.yaml", "--set", override)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and key in result.stderr, result.stderr


def test_a_one_view_method_refuses_strong_steps(workdir):
    result = cli("check", PIPELINES / "digits.yaml", "--set", "data.strong_augment=[cutout]")
    assert result.exit_code == 2 and "data.strong_augment" in result.stderr and "one view" in result.stderr


def test_strong_augment_leaves_the_data_fingerprint_and_the_teacher_cache_entry_alone():
    plain = load_data(data_config(), 0)
    strong = load_data(data_config(strong_augment=["randaugment"]), 0)
    assert plain.fingerprint == strong.fingerprint
    assert np.array_equal(plain.x_train.numpy(), strong.x_train.numpy())


def test_equalize_and_sharpness_follow_pil():
    from PIL import Image, ImageEnhance, ImageOps

    from kdpipe.data.strong import _equalize, _sharpness

    x = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    for image, equalized, sharpened in zip(x, _equalize(x, None), _sharpness(x, torch.tensor([0.3, 0.3]))):
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        assert np.array_equal(equalized.permute(1, 2, 0).numpy() * 255, np.asarray(ImageOps.equalize(pil)))
        expected = np.asarray(ImageEnhance.Sharpness(pil).enhance(0.3)).astype(np.float32) / 255
        assert np.abs(sharpened.permute(1, 2, 0).numpy() - expected).max() <= 1.5 / 255  # PIL rounds twice to 8 bits
