"""Decoding images with Pillow into uint8 C×H×W arrays of one size and channel count, and image-folder listing."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdpipe.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DecodeError(Exception):
    """An image that cannot be decoded; `name` says which (a file, or a row of a dataset)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class Decoder:
    """Raw image (file path, encoded bytes, {'bytes', 'path'} cell or H×W(×C) uint8 array) → uint8 C×H×W.

    `size` (H, W): resize so the image covers it (shorter side first), then center-crop; None keeps the size.
    """

    channels: int
    size: tuple[int, int] | None

    def __call__(self, raw: object, name: str) -> np.ndarray:
        try:
            image = _eight_bit(_open(raw), name)
            if image.mode in CONVERTED_THROUGH:
                image = image.convert(CONVERTED_THROUGH[image.mode])
            image = image.convert("L" if self.channels == 1 else "RGB")
        except UNREADABLE as exc:
            raise DecodeError(name, f"cannot decode the image ({exc})") from None
        if self.size is not None:
            image = _cover_and_crop(image, self.size)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def checked_shape(self, raw: object, name: str) -> tuple[int, ...]:
        """The shape the image decodes to, checked to decode at a fraction of a decode's cost where its format
        allows: a PNG's chunks are read to its end chunk with their checksums checked (Pillow's verify()), a JPEG's
        end-of-image marker is looked for after its scan data; other images are decoded."""
        try:
            with _open(raw, decode=False) as image:
                if image.format not in ("PNG", "JPEG"):
                    return self(raw, name).shape
                _check_mode(image, name)
                height, width = image.height, image.width
                if image.format == "PNG":
                    image.verify()
                elif not _jpeg_ends(image):
                    raise OSError("image file is truncated: no end-of-image marker")
        except UNREADABLE as exc:
            raise DecodeError(name, f"cannot decode the image ({exc})") from None
        return (self.channels, *(self.size or (height, width)))


# What Pillow raises for a file it cannot read (SyntaxError: a PNG whose chunks fail verify()).
UNREADABLE = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)
# Modes of 8-bit values, which Pillow's convert() renders as L or RGB (1 as 0 and 255; CMYK, YCbCr, HSV and LAB by
# its colour formulas). P and PA go through RGBA, so a palette's transparency is applied before alpha is dropped;
# LAB through RGB, the only mode Pillow converts it to.
EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"}
CONVERTED_THROUGH = {"P": "RGBA", "PA": "RGBA", "LAB": "RGB"}
# Pillow's convert() clips these to 0..255 (a 16-bit image turns white, a float one black), so they are scaled here.
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
SUPPORTED_MODES = EIGHT_BIT_MODES | SIXTEEN_BIT_MODES | {"I", "F"}


def _check_mode(image: Image.Image, name: str) -> None:
    if image.mode not in SUPPORTED_MODES:
        raise DecodeError(name, f"mode {image.mode} images are not supported "
                                f"(expected one of {', '.join(sorted(SUPPORTED_MODES))})")


def _eight_bit(image: Image.Image, name: str) -> Image.Image:
    """The image in an 8-bit mode, scaled from its real range: 16-bit values by 257 (65535 → 255), floats in [0, 1]
    by 255. Mode I (32-bit integers, as some Pillow versions open 16-bit PNGs) is read as 16-bit."""
    _check_mode(image, name)
    if image.mode in EIGHT_BIT_MODES:
        return image
    values = np.asarray(image)
    low, high = values.min(), values.max()
    if image.mode == "F":
        if not (0 <= low and high <= 1):  # NaN fails both
            raise DecodeError(name, f"float image with values in [{low:g}, {high:g}]; expected values in [0, 1]")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8))
    if low < 0 or high > 65535:
        raise DecodeError(name, f"32-bit integer image with values in [{low}, {high}]; expected values in 0..65535 "
                                f"(16 bits)")
    return Image.fromarray(np.rint(values / 257).astype(np.uint8))


def _jpeg_ends(image: Image.Image) -> bool:
    """Whether the JPEG holds its end-of-image marker (FF D9) after the scan header, where the coded data escapes
    every FF byte, so the pair can only be that marker: a truncated file has lost it."""
    image.fp.seek(image.tile[0][2])
    return b"\xff\xd9" in image.fp.read()


def _open(raw: object, decode: bool = True) -> Image.Image:
    if isinstance(raw, dict):  # a `datasets` Image cell
        raw = raw.get("bytes") or raw.get("path")
    if isinstance(raw, Image.Image):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        raw = io.BytesIO(raw)
    elif isinstance(raw, (np.ndarray, list)):
        array = np.asarray(raw)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"expected an H×W or H×W×C uint8 array, got {array.dtype} of shape {array.shape}")
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    elif raw is None:
        raise ValueError("no image")
    image = Image.open(raw)
    if decode:
        image.load()  # decode now: a truncated file fails here, not later
    return image


def _cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@dataclass
class FolderListing:
    files: list[Path]
    labels: np.ndarray
    classes: list[str]
    skipped: list[Path]  # files without an image suffix (README, .DS_Store …), left out and counted


def list_class_folders(root: Path) -> FolderListing:
    """Images under root/<class>/…; classes are the sorted folder names. An empty class folder is an error."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError("data.path", f"{root} has no class folders (expected {root}/<class>/<image files>)")
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file())
        images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise InputError("data.path", f"class folder {root / name} holds no images "
                                          f"(expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
        files += images
        labels += [label] * len(images)
    return FolderListing(files, np.asarray(labels, dtype=np.int64), classes, skipped)
