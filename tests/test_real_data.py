"""Real data as it comes: every image mode Pillow reads decoded by its real range (16-bit, float, palette, CMYK …),
streamed training images checked before a run starts, and `datasets` splits whose labels are matched by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, run_process, tracked_nothing
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.data.images import Decoder, DecodeError
from test_images import assert_input_error, image_copy, image_data, image_pipeline  # noqa: F401 - fixtures

GRADIENT = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


# --- decoding every mode by its real range ---------------------------------------------------------------------


def written(path: Path, image: Image.Image, mode: str) -> Path:
    """`image` saved to `path` by Pillow; asserts Pillow reads it back in `mode` (the case the test is about)."""
    image.save(path)
    with Image.open(path) as back:
        assert back.mode == mode, back.mode
    return path


def grey_16_bit_png(folder: Path) -> Path:
    return written(folder / "g.png", Image.fromarray(GRADIENT.astype(np.uint16) * 257), "I;16")


# (file written by Pillow in the mode named, the 8-bit grey content it holds)
GREY_FILES = {
    "I;16 (16-bit PNG)": grey_16_bit_png,
    "I;16B (16-bit big-endian TIFF)": lambda folder: written(
        folder / "g.tif", Image.fromarray((GRADIENT.astype(np.uint16) * 257).astype(">u2")), "I;16B"),
    "I (32-bit TIFF holding 16-bit values)": lambda folder: written(
        folder / "g.tif", Image.fromarray(GRADIENT.astype(np.int32) * 257), "I"),
    "F (float TIFF in [0, 1])": lambda folder: written(
        folder / "g.tif", Image.fromarray((GRADIENT / 255).astype(np.float32)), "F"),
    "LA (grey PNG with alpha)": lambda folder: written(
        folder / "g.png", Image.fromarray(np.stack([GRADIENT, 255 - GRADIENT], -1), "LA"), "LA"),
    "1 (1-bit PNG)": lambda folder: written(folder / "g.png", Image.fromarray(GRADIENT >= 128), "1"),
}


@pytest.mark.parametrize("case", GREY_FILES)
def test_grey_modes_decode_to_their_8_bit_content(tmp_path, case):
    path = GREY_FILES[case](tmp_path)
    expected = (GRADIENT >= 128) * np.uint8(255) if case.startswith("1 ") else GRADIENT
    assert np.array_equal(Decoder(1, None)(path, "g")[0], expected)
    assert np.array_equal(Decoder(3, None)(path, "g"), np.stack([expected] * 3))


def test_a_16_bit_png_read_as_mode_i_is_scaled_as_16_bits(tmp_path):
    """Some Pillow versions open 16-bit grey PNGs as mode I (32-bit integers); the values are 16-bit all the same."""
    as_mode_i = Image.open(grey_16_bit_png(tmp_path)).convert("I")
    assert np.array_equal(Decoder(1, None)(as_mode_i, "g")[0], GRADIENT)


def test_colour_modes_decode_to_their_colours(tmp_path):
    rgb = np.stack([GRADIENT, GRADIENT.T, 255 - GRADIENT], -1)
    # CMYK JPEG (as print workflows write them): back to the RGB it was made from, up to JPEG's loss.
    cmyk = written(tmp_path / "c.jpg", Image.fromarray(rgb).convert("CMYK"), "CMYK")
    decoded = Decoder(3, None)(cmyk, "c").transpose(1, 2, 0).astype(int)
    assert np.abs(decoded - rgb).mean() < 3
    # A palette PNG with a transparent entry: every pixel its palette colour, transparency dropped.
    palette = Image.fromarray((GRADIENT // 64).astype(np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    palette.info["transparency"] = 3
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], dtype=np.uint8)
    path = written(tmp_path / "p.png", palette, "P")
    assert np.array_equal(Decoder(3, None)(path, "p").transpose(1, 2, 0), colours[GRADIENT // 64])
    # PA (palette with alpha) and LAB, as they come from memory or a CIELAB TIFF: through RGB.
    pa = Image.merge("PA", [palette, Image.fromarray(GRADIENT)])
    assert np.array_equal(Decoder(3, None)(pa, "pa").transpose(1, 2, 0), colours[GRADIENT // 64])
    lab = written(tmp_path / "lab.tif", Image.new("LAB", (4, 4), (128, 128, 128)), "LAB")  # mid grey
    assert np.abs(Decoder(1, None)(lab, "lab").astype(int) - 119).max() <= 1  # sRGB of L* 50


@pytest.mark.parametrize("values, expected", [
    (np.linspace(0, 4, 16, dtype=np.float32).reshape(4, 4),
     "float image with values in [0, 4]; expected values in [0, 1]"),
    (np.full((4, 4), np.nan, np.float32), "float image with values in [nan, nan]; expected values in [0, 1]"),
    (np.full((4, 4), 70000, np.int32),
     "32-bit integer image with values in [70000, 70000]; expected values in 0..65535 (16 bits)"),
])
def test_values_beyond_the_mode_range_are_refused_naming_the_file(tmp_path, values, expected):
    path = tmp_path / "x.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(DecodeError) as refused:
        Decoder(3, None)(path, str(path))
    assert str(refused.value) == f"{path}: {expected}"


def test_a_mode_pillow_cannot_convert_is_refused_in_one_line():
    with pytest.raises(DecodeError, match=r"^x: mode La images are not supported \(expected one of 1, CMYK, F, "):
        Decoder(3, None)(Image.new("La", (4, 4)), "x")


def test_folders_of_16_bit_and_float_images_load_as_their_8_bit_rendering(tmp_path):
    """End to end through load_data: the same pictures as 8-bit PNGs, 16-bit PNGs and float TIFFs are one data set."""
    rng = np.random.default_rng(0)
    encodings = {"8-bit": (".png", lambda p: p), "16-bit": (".png", lambda p: p.astype(np.uint16) * 257),
                 "float": (".tif", lambda p: (p / 255).astype(np.float32))}
    for name in ("a", "b"):
        for i in range(10):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            for encoding, (suffix, encode) in encodings.items():
                path = tmp_path / encoding / name / f"{i}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(encode(pixels)).save(path)
    loaded = {e: load_data(data_config(source="imagefolder", path=tmp_path / e, channels=1, workers=0), 0)
              for e in encodings}
    for encoding in ("16-bit", "float"):
        for split in ("x_train", "x_val", "x_test"):
            assert torch.equal(getattr(loaded[encoding], split), getattr(loaded["8-bit"], split)), (encoding, split)


# --- streamed training images are checked before the run, as in-memory ones are --------------------------------


def replaced(path: Path, suffix: str, image: Image.Image) -> Path:
    """`image` written in place of the file `path`, in the format of `suffix`."""
    path.unlink()
    image.save(path.with_suffix(suffix))
    return path.with_suffix(suffix)


def truncated(path: Path, suffix: str, image: Image.Image, lost: int) -> Path:
    """`image` written in place of `path` in the format of `suffix`, less its last `lost` bytes."""
    path = replaced(path, suffix, image)
    path.write_bytes(path.read_bytes()[:-lost])
    return path


DAMAGE = {  # how a training image is spoiled → what the one line says about it
    "truncated PNG": (lambda p: truncated(p, ".png", Image.open(p).copy(), 40), "cannot decode the image"),
    # Headers whole, coded data cut short: only the missing end-of-image marker tells.
    "truncated JPEG": (lambda p: truncated(p, ".jpg", Image.open(p).convert("RGB"), 8),
                       "cannot decode the image (image file is truncated"),
    "odd-sized": (lambda p: replaced(p, ".png", Image.open(p).resize((20, 20))), "set data.image_size"),
    "float TIFF out of range": (lambda p: replaced(p, ".tif", Image.fromarray(np.full((16, 16), 2.0, np.float32))),
                                "expected values in [0, 1]"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_streamed_training_image_is_found_by_check(workdir, image_copy, damage):
    spoil, fragment = DAMAGE[damage]
    victim = spoil(sorted((image_copy / "train" / "one").iterdir())[5])
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=1, storage="stream", workers=1)
    assert_input_error(cli("check", path), path, "data.path", str(victim), fragment)


def test_a_truncated_streamed_image_stops_check_and_run_before_any_run_directory(workdir, image_copy):
    victim = sorted((image_copy / "train" / "zero").iterdir())[-1]
    victim = truncated(victim, ".jpg", Image.open(victim).convert("RGB"), 8)
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=1, storage="stream", workers=2)
    check = run_process("check", path)
    run = run_process("run", path, "--runs-dir", workdir / "runs")
    for proc in (check, run):
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"{path}: data.path: {victim}: cannot decode the image"), line
    assert run.stdout == "" and not (workdir / "runs").exists() and tracked_nothing(workdir)


# --- `datasets` splits: labels matched by class name ------------------------------------------------------------

# Each class's images are one grey level, so an image's label can be checked.
SHADES = {"cat": 40, "dog": 120, "fox": 200, "owl": 250}


def hf_split(names: list[str], label) -> object:
    """A `datasets` split of one 8×8 image per name in `names`, labelled through the feature `label`: a ClassLabel
    (its own index of each name), a string Value (the names) or an int Value (the name's place in SHADES)."""
    import datasets

    if isinstance(label, datasets.ClassLabel):
        values = [label.str2int(n) for n in names]
    else:
        values = names if label.dtype == "string" else [list(SHADES).index(n) for n in names]
    images = [Image.new("L", (8, 8), SHADES[n]) for n in names]
    return datasets.Dataset.from_dict({"img": images, "label": values},
                                      features=datasets.Features({"img": datasets.Image(), "label": label}))


def saved_hf(folder: Path, **splits) -> Path:
    import datasets

    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def hf_config(path: Path):
    return data_config(source="hf", path=path, image_column="img", label_column="label", channels=1, workers=0)


def class_names(splits, y: torch.Tensor) -> list[str]:
    return [splits.provenance["classes"][i] for i in y.tolist()]


def shade_names(x: torch.Tensor) -> list[str]:
    """Each image's class, told by its grey level."""
    by_shade = {shade: name for name, shade in SHADES.items()}
    return [by_shade[round(v * 255)] for v in x[:, 0, 0, 0].tolist()]


def test_hf_splits_whose_class_labels_list_names_in_another_order_are_matched_by_name(tmp_path):
    import datasets

    names = ["cat", "dog", "fox"] * 4
    path = saved_hf(tmp_path / "saved", train=hf_split(names, datasets.ClassLabel(names=["cat", "dog", "fox"])),
                    validation=hf_split(names, datasets.ClassLabel(names=["dog", "fox", "cat"])),
                    test=hf_split(names, datasets.ClassLabel(names=["fox", "cat", "dog"])))
    splits = load_data(hf_config(path), 0)
    assert splits.provenance["classes"] == ["cat", "dog", "fox"] and splits.num_classes == 3
    for x, y in ((splits.x_val, splits.y_val), (splits.x_test, splits.y_test)):
        assert class_names(splits, y) == shade_names(x) == names


def label_feature(kind: str):
    import datasets

    if kind.startswith("ClassLabel"):
        return datasets.ClassLabel(names=["cat", "dog", "owl" if "owl" in kind else "fox"])
    return datasets.Value("int64" if kind == "int" else "string")


@pytest.mark.parametrize("train, test, test_names, fragments", [
    ("ClassLabel", "ClassLabel with owl", ["cat", "dog", "owl"],
     ["classes differ from split train's", "only in test: ['owl']", "only in train: ['fox']"]),
    ("int", "string", ["cat", "dog", "fox"], ["labels are strings, but split train's are integers"]),
    ("ClassLabel", "string", ["cat", "dog", "fox"], ["labels are strings, but split train's are ClassLabel names"]),
    ("string", "string", ["cat", "dog", "owl"], ["labels ['owl'] never occur in split train"]),
])
def test_hf_splits_with_other_classes_or_labels_of_another_kind_are_refused(workdir, train, test, test_names,
                                                                            fragments):
    saved_hf(workdir / "saved", train=hf_split(["cat", "dog", "fox"] * 4, label_feature(train)),
             test=hf_split(test_names, label_feature(test)))
    path = image_pipeline(workdir / "p.yaml", source="hf", path="saved", image_column="img", label_column="label")
    assert_input_error(cli("check", path), path, "data.label_column", f"{workdir / 'saved'} split test: ", *fragments)


def test_an_unlabelled_class_label_row_is_refused_naming_the_split(workdir):
    """-1 is what `datasets` stores in a ClassLabel column for a row without a label."""
    unlabelled = hf_split(["cat", "dog", "fox"], label_feature("ClassLabel")).map(
        lambda row, i: {"label": -1 if i == 1 else row["label"]}, with_indices=True)
    saved_hf(workdir / "saved", train=hf_split(["cat", "dog", "fox"] * 4, label_feature("ClassLabel")), test=unlabelled)
    path = image_pipeline(workdir / "p.yaml", source="hf", path="saved", image_column="img", label_column="label")
    assert_input_error(cli("check", path), path, "data.label_column",
                       f"{workdir / 'saved'} split test: label -1 is not one of its ClassLabel's 3 classes (0..2)")


def test_hf_plain_label_columns(tmp_path):
    """A plain column (no ClassLabel): strings are class names, numbered in sorted order of the training split's
    names and matched by name in the others; integers are class indices as they are."""
    import datasets

    names = ["fox", "cat", "dog"] * 4
    strings = load_data(hf_config(saved_hf(tmp_path / "strings", train=hf_split(names, datasets.Value("string")),
                                           test=hf_split(["dog", "fox"], datasets.Value("string")))), 0)
    assert strings.provenance["classes"] == ["cat", "dog", "fox"]
    assert class_names(strings, strings.y_test) == shade_names(strings.x_test) == ["dog", "fox"]
    numbers = load_data(hf_config(saved_hf(tmp_path / "ints", train=hf_split(names, datasets.Value("int64")),
                                           test=hf_split(["dog", "fox"], datasets.Value("int64")))), 0)
    assert numbers.provenance["classes"] is None and numbers.y_test.tolist() == [1, 2]
