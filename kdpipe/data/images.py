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
            image = _open(raw)
            if image.mode == "P":  # through RGBA, so a palette's transparency is handled before it is dropped
                image = image.convert("RGBA")
            image = image.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise DecodeError(name, f"cannot decode the image ({exc})") from None
        if self.size is not None:
            image = _cover_and_crop(image, self.size)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _open(raw: object) -> Image.Image:
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


def image_size(raw: object, name: str) -> tuple[int, int]:
    """(height, width) from the image's header, without decoding its pixels."""
    try:
        if isinstance(raw, (np.ndarray, list)):
            return tuple(np.asarray(raw).shape[:2])
        if isinstance(raw, dict):
            raw = raw.get("bytes") or raw.get("path")
        with Image.open(io.BytesIO(raw) if isinstance(raw, (bytes, bytearray)) else raw) as image:
            return image.height, image.width
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise DecodeError(name, f"cannot read the image ({exc})") from None


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
