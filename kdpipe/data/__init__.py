"""Datasets: built-in digits, npz and csv files, image folders, CIFAR archives and local `datasets` data;
deterministic splits.

Data that fits in memory lives on the training device as tensors (images as
uint8, converted per batch), so a training step is an index into them, with no
DataLoader machinery; image data larger than memory is streamed by DataLoader
workers. Validation and test samples are held in memory as stored (8-bit images
as uint8) and converted when read (Splits.x_val, x_test).
"""

from __future__ import annotations


import numpy as np
import torch

from kdpipe.config_data import DataConfig
from kdpipe.data.augment import Augmentation
from kdpipe.data.images import Decoder
from kdpipe.data.sources import SPLIT_NAMES, Part, Source, read_source
from kdpipe.data.splits import InputConversion, Splits, stratified_split
from kdpipe.data.storage import StreamedImages, check_all, choose_storage, decode_all, first_image, worker_count
from kdpipe.errors import InputError
from kdpipe.fingerprint import Fingerprint

__all__ = ["InputConversion", "Splits", "load_data", "stratified_split"]


def load_data(cfg: DataConfig, seed: int, device: torch.device | None = None) -> Splits:
    """Read, check, split and store the configured data. `device`: where training runs (for `storage: auto`)."""
    source = read_source(cfg)
    for part in source.parts.values():
        part.y = _labels(part.y, part.origin)
    parts = _split(source, cfg, seed)
    num_classes = _num_classes(parts, cfg, source.classes)
    if isinstance(parts["train"].x, np.ndarray):
        stored, train, storage = _arrays(parts, cfg)
    else:
        stored, train, storage = _images(parts, cfg, device)
    sample_shape = tuple(stored["val"].shape[1:])
    normalization = cfg.normalization
    if normalization is not None and (len(sample_shape) != 3 or len(normalization[0]) != sample_shape[0]):
        raise InputError("data.normalize", f"expected {sample_shape[0] if len(sample_shape) == 3 else 'image'} "
                                           f"channels' statistics for samples of shape {sample_shape}, "
                                           f"got {len(normalization[0])} values")
    conversion = InputConversion(255.0 if stored["val"].dtype == np.uint8 else None,
                                 *(tuple(v) for v in normalization) if normalization else (None, None))
    augmentation = Augmentation(cfg.augment, sample_shape) if cfg.augment else None
    strong = Augmentation(cfg.strong_augment, sample_shape, "data.strong_augment") if cfg.strong_augment else None

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(stored[split]), torch.from_numpy(parts[split].y)

    stored_val, y_val = tensors("val")
    stored_test, y_test = tensors("test")
    provenance = {
        "source": cfg.source,
        "splits": {s: {"from": parts[s].origin, "size": len(parts[s].y)} for s in SPLIT_NAMES},
        "storage": storage,
        "stored_dtype": str(stored["val"].dtype),
        "classes": source.classes,
        "skipped_files": {"count": len(source.skipped), "first": source.skipped[:5]},
    }
    splits = Splits(train if storage == "memory" else None, torch.from_numpy(parts["train"].y), stored_val, y_val,
                    stored_test, y_test, num_classes, _fingerprint(parts, stored, cfg, seed, num_classes),
                    conversion, augmentation, train if storage == "stream" else None, provenance, strong)
    return splits


def _split(source: Source, cfg: DataConfig, seed: int) -> dict[str, Part]:
    """train/val/test: given splits as they are, the others split off by class (stratified) from the training data."""
    given = source.parts
    if "all" in given:
        everything = given["all"]
        test_idx, val_idx, train_idx = stratified_split(everything.y, [cfg.test_fraction, cfg.val_fraction], seed)
        split_off = f"{everything.origin}, split by class with seed {seed}"
        if min(len(train_idx), len(val_idx), len(test_idx)) == 0:
            raise InputError("data", f"too few samples ({len(everything.y)}) to split into train, validation and test")
        return {"train": everything.subset(train_idx, f"{split_off}: the rest"),
                "val": everything.subset(val_idx, f"{split_off}: val_fraction {cfg.val_fraction}"),
                "test": everything.subset(test_idx, f"{split_off}: test_fraction {cfg.test_fraction}")}
    for split in ("val", "test"):
        if split in given and f"{split}_fraction" in cfg.model_fields_set:
            raise InputError(f"data.{split}_fraction", f"the data gives its {split} split ({given[split].origin}), "
                                                       f"so {split}_fraction would be ignored: remove it")
    parts = {"train": given["train"]}
    for split in ("test", "val"):
        if split in given:
            parts[split] = given[split]
            continue
        fraction = getattr(cfg, f"{split}_fraction")
        rest = parts["train"]
        taken, kept = stratified_split(rest.y, [fraction], seed)
        parts[split] = rest.subset(taken, f"{rest.origin}, {split}_fraction {fraction} split off by class (seed {seed})")
        parts["train"] = rest.subset(kept, f"{rest.origin}, less the {split} split")
    for split in SPLIT_NAMES:
        if len(parts[split].y) == 0:
            raise InputError("data", f"the {split} split is empty ({parts[split].origin})")
    return parts


def _num_classes(parts: dict[str, Part], cfg: DataConfig, classes: list[str] | None) -> int:
    all_labels = np.concatenate([p.y for p in parts.values()])
    if len(np.unique(parts["train"].y)) < 2:
        raise InputError(cfg.input_key, f"the training split has a single class ({parts['train'].origin}): "
                                        "nothing to classify")
    highest = int(all_labels.max())
    if cfg.num_classes is not None:
        if highest >= cfg.num_classes:
            raise InputError("data.num_classes", f"labels go up to {highest}, which needs more than {cfg.num_classes} classes")
        return cfg.num_classes
    if classes is not None:
        return len(classes)
    missing = sorted(set(range(highest + 1)) - set(np.unique(all_labels).tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" …" if len(missing) > 5 else "")
        raise InputError("data.num_classes", f"labels go up to {highest} but {len(missing)} of 0..{highest} never occur "
                                             f"(missing {shown}); relabel them 0..K-1 or set num_classes to {highest + 1}")
    return highest + 1


def _arrays(parts: dict[str, Part], cfg: DataConfig) -> tuple[dict[str, np.ndarray], torch.Tensor, str]:
    stored = {s: _as_samples(p.x, cfg, p.origin) for s, p in parts.items()}
    for split, x in stored.items():
        if x.shape[1:] != stored["train"].shape[1:]:
            raise InputError("data.path", f"{parts[split].origin}: samples of shape {x.shape[1:]}, but the training "
                                          f"samples have shape {stored['train'].shape[1:]}")
        if x.dtype != stored["train"].dtype:
            raise InputError("data.path", f"{parts[split].origin}: {x.dtype} samples, but the training samples are "
                                          f"{stored['train'].dtype}")
    return stored, torch.from_numpy(stored["train"]), "memory"


def _as_samples(x: np.ndarray, cfg: DataConfig, origin: str) -> np.ndarray:
    """Samples as N×D features or N×C×H×W images; uint8 kept (scaled per batch), other numbers as float32."""
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise InputError("data.path", f"{origin}: expected numeric samples, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise InputError("data.path", f"{origin}: {bad} non-finite values (NaN or inf) in the samples")
    shape, layout = getattr(cfg, "shape", None), getattr(cfg, "layout", "auto")  # ArrayData's keys; cifar has none
    if shape is not None:
        per_sample = int(np.prod(shape))
        if x[0].size != per_sample:
            raise InputError("data.shape", f"shape {shape} holds {per_sample} values but each sample has {x[0].size}")
        x = x.reshape(len(x), *shape)
    elif x.ndim == 3:  # N×H×W: one channel
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2) if _layout(x.shape, layout, origin) == "nhwc" else x
    elif x.ndim != 2:
        raise InputError("data.path", f"{origin}: expected samples as N×D, N×H×W, N×C×H×W or N×H×W×C, got shape {x.shape}")
    if cfg.channels is not None and x.ndim == 4 and x.shape[1] != cfg.channels:
        x = _convert_channels(x, cfg.channels, origin)
    dtype = np.uint8 if x.dtype == np.uint8 else np.float32
    return np.ascontiguousarray(x, dtype=dtype)


IMAGE_CHANNELS = (1, 3, 4)


def _layout(shape: tuple[int, ...], layout: str, origin: str) -> str:
    """nchw or nhwc for a 4-d image array: as configured, or told by which axis can hold image channels."""
    if layout != "auto":
        return layout
    first, last = shape[1] in IMAGE_CHANNELS, shape[3] in IMAGE_CHANNELS
    if first != last:
        return "nchw" if first else "nhwc"
    raise InputError("data.layout", f"{origin}: cannot tell whether samples of shape {shape[1:]} are C×H×W or "
                                    f"H×W×C; set layout to nchw or nhwc")


def _convert_channels(x: np.ndarray, channels: int, origin: str) -> np.ndarray:
    have = x.shape[1]
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if have in (3, 4) and channels == 1:  # ITU-R 601 luma, as Pillow's "L"; alpha dropped
        luma = np.tensordot(np.array([0.299, 0.587, 0.114]), x[:, :3].astype(np.float64), axes=(0, 1))[:, None]
        return np.rint(luma).astype(np.uint8) if x.dtype == np.uint8 else luma.astype(np.float32)
    if have == 4 and channels == 3:
        return x[:, :3]
    raise InputError("data.channels", f"{origin}: cannot convert {have}-channel samples to {channels} channels")


def _images(parts: dict[str, Part], cfg: DataConfig, device: torch.device | None):
    """val/test decoded into memory; train decoded into memory or streamed, as `storage` says."""
    decoder = Decoder(cfg.channels or 3, cfg.size)
    workers = worker_count(cfg.workers)
    shape = first_image(parts["train"].x, decoder).shape
    storage = choose_storage(cfg.storage, len(parts["train"].y), shape, device)
    if storage == "stream":  # what decoding every training image in memory would find, found as cheaply as can be
        check_all(parts["train"].x, decoder, workers, shape)
    decoded = ("train", "val", "test") if storage == "memory" else ("val", "test")
    stored = dict(zip(decoded, decode_all([parts[s].x for s in decoded], decoder, workers, shape)))
    if storage == "memory":
        return stored, torch.from_numpy(stored["train"]), storage
    return stored, StreamedImages(parts["train"].x, decoder, shape, workers), storage


def _fingerprint(parts: dict[str, Part], stored: dict[str, np.ndarray], cfg: DataConfig, seed: int,
                 num_classes: int) -> str:
    """Content hash of arrays; images by their records' identity (paths, sizes and times), never read again."""
    digest = Fingerprint()
    for split in SPLIT_NAMES:
        x = parts[split].x
        digest.add(stored[split] if split in stored else x.identity(), parts[split].y)
    # strong_augment is not hashed: only the training of a two-view method reads it, and a teacher trained on the
    # same data and `augment` keeps its cache entry.
    settings = cfg.model_dump(mode="json", include={"image_size", "channels", "normalize", "augment", "layout", "shape"})
    return digest.add([seed, cfg.val_fraction, cfg.test_fraction, num_classes, settings]).hexdigest()


def _labels(y: np.ndarray, origin: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError("data.path", f"{origin}: expected labels as a 1-d array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)) \
            or (y < 0).any():
        raise InputError("data.path", f"{origin}: expected integer class labels ≥ 0")
    return y.astype(np.int64)
