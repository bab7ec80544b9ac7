"""Image data: image folders (given splits, or class folders split by fraction), local `datasets` data saved to disk
or as parquet, uint8 storage and streaming, and every bad image input (exit 2, one line naming the file or key)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from conftest import FAST, PIPELINES, cli, read_report, sets
from kdpipe.data.sources import data_config
from kdpipe.pipeline import load_pipeline
from kdpipe.data import load_data

CLASSES = ["four", "one", "seven", "zero"]  # sorted folder names; labels follow this order
DIGIT_OF = {"zero": 0, "one": 1, "four": 4, "seven": 7}
PER_CLASS = 100


def digit_images() -> list[tuple[str, int, np.ndarray]]:
    """(class name, index, 16×16 uint8 image) for PER_CLASS digits of each class: 8×8 digits upscaled."""
    digits = load_digits()
    found = []
    for name, digit in DIGIT_OF.items():
        for i in np.flatnonzero(digits.target == digit)[:PER_CLASS]:
            image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16), Image.Resampling.NEAREST)
            found.append((name, int(i), np.asarray(image)))
    return found


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> dict[str, Path]:
    """Written once per session: `splits/{train,val,test}/<class>/*.png` and `flat/<class>/*` (mixed formats,
    modes and sizes, plus a README that is not an image)."""
    root = tmp_path_factory.mktemp("images")
    formats = [("png", "L"), ("jpeg", "RGB"), ("bmp", "RGB"), ("webp", "RGB"), ("png", "RGBA")]
    for k, (name, i, pixels) in enumerate(digit_images()):
        split = ("train", "train", "train", "val", "test")[k % 5]
        path = root / "splits" / split / name / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        suffix, mode = formats[k % len(formats)]
        image = Image.fromarray(pixels).convert(mode)
        if k % 7 == 0:  # some larger and not square: resized (shorter side) and center-cropped to image_size
            image = image.resize((24, 20))
        path = root / "flat" / name / f"{i}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (root / "flat" / "one" / "README.txt").write_text("not an image\n")
    return {"splits": root / "splits", "flat": root / "flat"}


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.png"))


def test_image_folder_with_given_splits_is_read_as_given(image_data):
    root = image_data["splits"]
    splits = load_data(data_config(source="imagefolder", path=root, channels=1), seed=0)
    assert splits.sizes() == {s: count_files(root / s) for s in ("train", "val", "test")}
    assert splits.num_classes == 4 and splits.provenance["classes"] == CLASSES
    assert splits.input_shape == (1, 16, 16)
    # Training images stay uint8 (4× smaller than float32); val/test are model-ready floats in [0, 1].
    assert splits.x_train.dtype == torch.uint8 and splits.stored_dtype == torch.uint8
    assert splits.x_train.shape == (splits.sizes()["train"], 1, 16, 16)
    assert splits.x_val.dtype == torch.float32 and 0.0 <= splits.x_val.min() and splits.x_val.max() <= 1.0
    for split in ("train", "val", "test"):
        assert splits.provenance["splits"][split]["from"] == f"{root / split} (image folders)"
    # The first validation image is the first file of the first class, decoded exactly.
    first = sorted((root / "val" / "four").iterdir())[0]
    assert torch.equal(splits.x_val[0, 0], torch.from_numpy(np.array(Image.open(first))).float() / 255)
    assert splits.y_val[0] == 0
    # A training batch is the stored images scaled to [0, 1]; train_inputs is the same, in order.
    index, x, y = next(splits.train_batches(8, torch.Generator().manual_seed(0)))
    assert torch.equal(x, splits.x_train[index].float() / 255) and torch.equal(y, splits.y_train[index])
    _, first_inputs = next(splits.train_inputs(4))
    assert torch.equal(first_inputs, splits.x_train[:4].float() / 255)


def test_class_folders_of_mixed_formats_are_split_by_fraction(image_data):
    cfg = data_config(source="imagefolder", path=image_data["flat"], image_size=[12, 14], channels=3,
                     val_fraction=0.2, test_fraction=0.2)
    splits = load_data(cfg, seed=0)
    assert sum(splits.sizes().values()) == 4 * PER_CLASS
    assert splits.input_shape == (3, 12, 14)
    for y in (splits.y_train, splits.y_val, splits.y_test):  # stratified: every class in every split
        assert torch.bincount(y, minlength=4).min() > 0
    assert splits.sizes()["val"] == splits.sizes()["test"] == 4 * round(0.2 * PER_CLASS)
    # The README is left out and counted, never decoded.
    assert splits.provenance["skipped_files"] == {"count": 1, "first": [str(image_data["flat"] / "one" / "README.txt")]}
    assert "val_fraction 0.2" in splits.provenance["splits"]["val"]["from"]
    # Grey, RGB and RGBA files all became 3 equal channels (the digits are grey); JPEG/WebP differ only slightly.
    assert (splits.x_train[:, 0].int() - splits.x_train[:, 2].int()).abs().max() <= 8
    again = load_data(cfg, seed=0)
    assert again.fingerprint == splits.fingerprint and torch.equal(again.x_train, splits.x_train)


def test_decoder_converts_modes_and_covers_the_size():
    from kdpipe.data.images import Decoder

    rgba = Image.new("RGBA", (40, 20), (200, 100, 50, 128))
    assert Decoder(3, (10, 10))(rgba, "x").shape == (3, 10, 10)
    grey = Decoder(1, None)(rgba, "x")
    assert grey.shape == (1, 20, 40) and grey[0, 0, 0] == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    # Shorter side first: a 40×20 image becomes 20×10, then 10×10 from its center: only the white band is left.
    stripes = np.zeros((20, 40), dtype=np.uint8)
    stripes[:, 6:34] = 255  # wider than the crop, so bilinear edges fall outside it
    assert (Decoder(1, (10, 10))(stripes, "x") == 255).all()


def test_streamed_training_batches_equal_the_in_memory_ones(image_data):
    root = image_data["splits"]
    memory = load_data(data_config(source="imagefolder", path=root, channels=1, storage="memory"), seed=0)
    stream = load_data(data_config(source="imagefolder", path=root, channels=1, storage="stream", workers=2), seed=0)
    assert stream.x_train is None and stream.stored_dtype == torch.uint8
    assert stream.provenance["storage"] == "stream" and memory.provenance["storage"] == "memory"
    assert torch.equal(stream.x_val, memory.x_val) and torch.equal(stream.y_train, memory.y_train)
    for _ in range(2):  # the persistent workers serve a second epoch
        a = list(memory.train_batches(32, torch.Generator().manual_seed(1)))
        b = list(stream.train_batches(32, torch.Generator().manual_seed(1)))
        assert len(a) == len(b) == -(-memory.sizes()["train"] // 32)
        for (ia, xa, ya), (ib, xb, yb) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [x.shape for x in stream.calibration_inputs(2, 16, 0)] == [(16, 1, 16, 16)] * 2
    assert np.array_equal(np.concatenate(stream.calibration_inputs(2, 16, 0)),
                          np.concatenate(memory.calibration_inputs(2, 16, 0)))


def test_streaming_fingerprint_follows_file_changes_without_decoding(tmp_path, image_data, monkeypatch):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(image_data["splits"], root)
    cfg = data_config(source="imagefolder", path=root, channels=1, storage="stream", workers=0)
    before = load_data(cfg, seed=0).fingerprint
    # Training images are decoded only when batches are drawn: loading touches no training pixel.
    from kdpipe.data import images

    decoded = []
    original = images.Decoder.__call__
    monkeypatch.setattr(images.Decoder, "__call__", lambda self, raw, name: decoded.append(name) or original(self, raw, name))
    assert load_data(cfg, seed=0).fingerprint == before
    assert sum("/train/" in name for name in decoded) == 1  # the first, for the image shape
    assert sum("/val/" in name for name in decoded) > 1
    changed = next((root / "train" / "one").iterdir())
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert load_data(cfg, seed=0).fingerprint != before


def test_auto_storage_streams_what_does_not_fit(monkeypatch, image_data):
    from kdpipe.data import storage

    cfg = data_config(source="imagefolder", path=image_data["splits"], channels=1, workers=0)
    assert load_data(cfg, seed=0).provenance["storage"] == "memory"
    monkeypatch.setattr(storage, "available_bytes", lambda device: 1000)  # far less than 240 × 256 bytes × 2
    assert load_data(cfg, seed=0).provenance["storage"] == "stream"


def hf_dataset(images_of=lambda pixels: Image.fromarray(pixels)):
    import datasets

    found = digit_images()
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"img": [images_of(p) for _, _, p in found],
                                       "digit": [CLASSES.index(name) for name, _, _ in found]}, features=features)


def test_hf_dataset_saved_to_disk(tmp_path):
    hf_dataset().save_to_disk(str(tmp_path / "saved"))
    cfg = data_config(source="hf", path=tmp_path / "saved", image_column="img", label_column="digit", image_size=8)
    splits = load_data(cfg, seed=0)
    assert sum(splits.sizes().values()) == 4 * PER_CLASS
    assert splits.input_shape == (3, 8, 8) and splits.x_train.dtype == torch.uint8
    assert splits.provenance["classes"] == CLASSES and splits.num_classes == 4


def test_hf_dataset_dict_gives_its_splits_and_parquet_reads_alike(tmp_path):
    import datasets

    parts = hf_dataset().train_test_split(test_size=0.25, seed=0)
    held = parts["test"].train_test_split(test_size=0.5, seed=0)
    datasets.DatasetDict({"train": parts["train"], "validation": held["train"], "test": held["test"]}).save_to_disk(
        str(tmp_path / "dict"))
    splits = load_data(data_config(source="hf", path=tmp_path / "dict", image_column="img", label_column="digit",
                                  channels=1), seed=0)
    assert splits.sizes() == {"train": 300, "val": 50, "test": 50}
    assert splits.provenance["splits"]["val"]["from"] == f"{tmp_path / 'dict'} split val (hf)"
    assert splits.input_shape == (1, 16, 16)

    parts["train"].to_parquet(str(tmp_path / "train.parquet"))
    from_parquet = load_data(data_config(source="hf", path=tmp_path / "train.parquet", image_column="img",
                                        label_column="digit", channels=1), seed=0)
    assert sum(from_parquet.sizes().values()) == 300 and from_parquet.provenance["classes"] == CLASSES
    assert from_parquet.x_val.mean().item() == pytest.approx(splits.x_train.float().mean().item() / 255, abs=0.05)


# --- bad input: one line, exit 2, naming the file or key -------------------------------------------------------


def image_pipeline(file: Path, **data) -> Path:
    """pipelines/digits.yaml with this `data:` section, written to `file`."""
    raw = yaml.safe_load((PIPELINES / "digits.yaml").read_text())
    raw["data"] = {"source": "imagefolder", "batch_size": 32, **data}
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return file


def assert_input_error(result, file, key, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{file}: {key}: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def image_copy(workdir, image_data) -> Path:
    import shutil

    return Path(shutil.copytree(image_data["splits"], workdir / "pets"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_is_named(workdir, image_copy, damage):
    victim = sorted((image_copy / "val" / "seven").iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=1)
    assert_input_error(cli("check", path), path, "data.path", str(victim), "cannot decode the image")


def test_a_corrupt_training_image_is_named_when_decoded_by_workers(workdir, image_copy):
    victim = sorted((image_copy / "train" / "zero").iterdir())[-1]
    victim.write_bytes(victim.read_bytes()[:40])
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=1, workers=2)
    assert_input_error(cli("check", path), path, "data.path", str(victim), "cannot decode the image")


def test_an_empty_class_folder(workdir, image_copy):
    (image_copy / "train" / "eight").mkdir()
    (image_copy / "train" / "eight" / "notes.txt").write_text("todo\n")
    path = image_pipeline(workdir / "p.yaml", path="pets")
    assert_input_error(cli("check", path), path, "data.path", str(image_copy / "train" / "eight"), "holds no images")


def test_different_classes_in_train_and_val(workdir, image_copy):
    (image_copy / "val" / "seven").rename(image_copy / "val" / "eight")
    path = image_pipeline(workdir / "p.yaml", path="pets")
    assert_input_error(cli("check", path), path, "data.path", "different classes", "only in val: ['eight']",
                       "only in train: ['seven']")


def test_images_of_different_sizes_need_image_size(workdir, image_copy):
    victim = sorted((image_copy / "val" / "one").iterdir())[0]
    Image.open(victim).resize((20, 20)).save(victim)
    path = image_pipeline(workdir / "p.yaml", path="pets")
    assert_input_error(cli("check", path), path, "data.path", str(victim), "set data.image_size")
    assert cli("check", image_pipeline(workdir / "q.yaml", path="pets", image_size=16)).exit_code == 0


def test_hf_dataset_without_the_label_column(workdir):
    hf_dataset().save_to_disk(str(workdir / "saved"))
    path = image_pipeline(workdir / "p.yaml", source="hf", path="saved", image_column="img")
    assert_input_error(cli("check", path), path, "data.label_column", "has no column 'label'", "img, digit")


def test_relative_data_path_resolves_against_the_pipeline_folder(workdir, image_copy, monkeypatch):
    folder = workdir / "pipelines"
    folder.mkdir()
    path = image_pipeline(folder / "p.yaml", path="../pets")
    monkeypatch.chdir(folder.parent.parent)  # anywhere but the pipeline's folder
    assert load_pipeline(path).data.path == (folder / "../pets").resolve()
    assert cli("check", path).exit_code == 0
    missing = image_pipeline(folder / "q.yaml", path="pets")
    assert_input_error(cli("check", missing), missing, "data.path", "data file not found: pets",
                       f"resolved against {folder}, the pipeline file's folder")


# --- end to end -------------------------------------------------------------------------------------------------


def test_image_folder_pipeline_with_augmentation_runs_end_to_end(workdir, image_copy):
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=1, normalize={"mean": [0.3], "std": [0.35]},
                          augment=[{"random_crop": {"padding": 2}}, "hflip"])
    # A few images and epochs, enough to be clearly above chance (the gate on by default): the data path works.
    result = cli("run", path, *sets(*FAST, "teacher.train.epochs=10", "distill.epochs=8", "export.quantize=none",
                                    "export.deliver=fp32", "validate.gates.accuracy_min=0.0",
                                    "validate.gates.max_accuracy_drop_vs_teacher=1.0"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed"
    assert report["data"]["train"] == count_files(image_copy / "train")
    splits = report["data"]["provenance"]["splits"]  # where each split came from, and its size (issue 16.6)
    assert splits["train"]["size"] == report["data"]["train"] and "train" in splits["train"]["from"]
    assert splits["val"]["size"] == report["data"]["val"] and "val" in splits["val"]["from"]


def test_hf_images_stream_like_they_sit_in_memory(tmp_path):
    hf_dataset().save_to_disk(str(tmp_path / "saved"))
    common = dict(source="hf", path=tmp_path / "saved", image_column="img", label_column="digit", channels=1)
    memory = load_data(data_config(**common, storage="memory"), seed=0)
    stream = load_data(data_config(**common, storage="stream", workers=1), seed=0)
    (_, a, _), (_, b, _) = (next(s.train_batches(16, torch.Generator().manual_seed(0))) for s in (memory, stream))
    assert torch.equal(a, b)


def test_a_student_learns_from_augmented_image_batches(image_data):
    """The contract the training loop uses, end to end in-process: augmented float batches from uint8 images."""
    from kdpipe.config import ModelConfig
    from kdpipe.models import build_model

    splits = load_data(data_config(source="imagefolder", path=image_data["splits"], channels=1,
                                  normalize={"mean": [0.3], "std": [0.35]},
                                  augment=[{"random_crop": {"padding": 2}}, "hflip"]), seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", width=8, depth=2), "student.model", splits.input_shape,
                        splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        for _, x, y in splits.train_batches(32, generator):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(splits.x_val).argmax(1) == splits.y_val).float().mean().item()
    assert accuracy > 0.7  # 4 classes: chance is 0.25 (0.84 when written; 0.975 without augmentation)
