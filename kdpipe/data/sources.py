"""Reading each source into samples per split, before any splitting, decoding or conversion.

A source gives either the whole data set (part "all", split later by the
configured fractions) or some of its splits as given (parts "train", "val",
"test"). Images stay undecoded here (`ImageRecords`), so streaming never
decodes a file twice.

Sources are a registry (`data_sources`): each names its data section (kdpipe.config_data) and its reader; a
plugin adds one through the entry point group kdpipe.sources, and the data section of a pipeline file is the
union of the sources' sections discriminated by `source` (`data_union`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import json
import pickle
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union

import numpy as np
from pydantic import Field, TypeAdapter, create_model

from kdpipe.config_data import (CifarData, CsvData, DataConfig, DigitsData, HfData, ImageFolderData, NpzData,
                                augment_step_model)
from kdpipe.data.augment import augment_steps
from kdpipe.data.images import list_class_folders
from kdpipe.errors import InputError
from kdpipe.fingerprint import fingerprint
from kdpipe.plugins import load_plugins

SPLIT_NAMES = ("train", "val", "test")
HF_SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}


@dataclass
class ImageRecords:
    """Undecoded images, one per row; subclasses say how to read one and name it in an error."""

    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index: np.ndarray) -> ImageRecords:
        return dataclasses.replace(self, rows=self.rows[index])

    def raw(self, i: int) -> object:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def identity(self) -> str:
        """A digest that changes when any image may have changed, without reading the images."""
        raise NotImplementedError


def _file_identity(path: Path) -> list:
    """What changes when a file may have changed, without reading it: its path, size and modification time."""
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


@dataclass
class ImageFiles(ImageRecords):
    files: list[Path] = field(default_factory=list)

    def raw(self, i: int) -> object:
        return self.files[self.rows[i]]

    def name(self, i: int) -> str:
        return str(self.files[self.rows[i]])

    def identity(self) -> str:
        return fingerprint([_file_identity(self.files[row]) for row in self.rows])


@dataclass
class ArrowImages(ImageRecords):
    column: object = None  # pyarrow ChunkedArray of image cells (memory-mapped from the dataset's files)
    origin: str = ""
    files: list[Path] = field(default_factory=list)

    def raw(self, i: int) -> object:
        return self.column[int(self.rows[i])].as_py()

    def name(self, i: int) -> str:
        return f"{self.origin} row {int(self.rows[i])}"

    def identity(self) -> str:
        return fingerprint(self.rows, [_file_identity(path) for path in self.files])


@dataclass
class Part:
    """One split's samples as read: an array (features or images) or undecoded images, and their labels."""

    x: np.ndarray | ImageRecords
    y: np.ndarray
    origin: str  # where it came from, for the report

    def subset(self, index: np.ndarray, origin: str) -> Part:
        return Part(self.x[index] if isinstance(self.x, np.ndarray) else self.x.subset(index), self.y[index], origin)


@dataclass
class Source:
    parts: dict[str, Part]  # "all", or "train" with "val" and/or "test" when the source gives them
    classes: list[str] | None = None  # class names by label, when the source has them
    skipped: list[str] = field(default_factory=list)  # files left out as not images


def read_source(cfg: DataConfig) -> Source:
    return data_sources()[cfg.source].read(cfg)


def digits_file() -> Path:
    """The digits table scikit-learn ships (what its load_digits reads), found without importing scikit-learn,
    whose import costs every run about two seconds of start-up."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("data.source", "the digits source needs scikit-learn, which is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def _read_digits(cfg: DigitsData) -> Source:
    table = np.loadtxt(digits_file(), delimiter=",")  # a row: 64 pixels (row by row), then the label
    # 8×8 grey images with values 0..16, scaled to [0, 1].
    images = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0
    return Source({"all": Part(images, table[:, -1].astype(int), "scikit-learn digits")})


def data_path(cfg: DataConfig) -> Path:
    """The source's `path`, which must exist (a pipeline file's relative path was resolved when it was loaded)."""
    path = Path(cfg.path)
    if not path.exists():
        raise InputError("data.path", f"data file not found: {path} (resolved against {Path.cwd()}, the working directory)")
    return path


def _read_npz(cfg: NpzData) -> Source:
    path = data_path(cfg)
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a file that is not an npz
        raise InputError("data.path", f"cannot read {path} as .npz: {exc}") from None
    missing = [k for k in ("x", "y") if k not in arrays.files]
    if missing:
        raise InputError("data.path", f"{path} has no array {' or '.join(repr(m) for m in missing)} (found: "
                                      f"{', '.join(arrays.files) or 'none'}); expected 'x' and 'y', optionally "
                                      f"'x_val' and 'y_val', 'x_test' and 'y_test'")
    parts = {"train": Part(arrays["x"], arrays["y"], f"{path} x, y")}
    for split in ("val", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        if (x_key in arrays.files) != (y_key in arrays.files):
            raise InputError("data.path", f"{path} has '{x_key if x_key in arrays.files else y_key}' without "
                                          f"'{y_key if x_key in arrays.files else x_key}'")
        if x_key in arrays.files:
            parts[split] = Part(arrays[x_key], arrays[y_key], f"{path} {x_key}, {y_key}")
    for name, part in parts.items():
        if len(part.x) != len(part.y):
            raise InputError("data.path", f"{part.origin}: {len(part.x)} samples but {len(part.y)} labels")
    if len(parts) == 1:
        parts = {"all": parts["train"]}
    return Source(parts)


def _read_csv(cfg: CsvData) -> Source:
    path = data_path(cfg)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise InputError("data.path", f"{path} is empty")
    header, body = rows[0], rows[1:]
    for key, column in (("data.label_column", cfg.label_column), ("data.split_column", cfg.split_column)):
        if column is not None and column not in header:
            raise InputError(key, f"no column '{column}' in {path} (columns: {', '.join(header)})")
    label_col = header.index(cfg.label_column)
    split_col = header.index(cfg.split_column) if cfg.split_column else None
    features = [i for i in range(len(header)) if i not in (label_col, split_col)]
    try:
        values = np.array([[float(r[i]) for i in features] for r in body], dtype=np.float32)
        labels = np.array([float(r[label_col]) for r in body])
    except (ValueError, IndexError) as exc:
        raise InputError("data.path", f"{path}: expected numeric feature and label values in every row ({exc})") from None
    if split_col is None:
        return Source({"all": Part(values, labels, str(path))})
    splits = np.array([r[split_col].strip().lower() for r in body])
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        raise InputError("data.split_column", f"{path}: column '{cfg.split_column}' holds '{unknown[0]}'; "
                                              f"expected train, val or test")
    parts = {s: Part(values[splits == s], labels[splits == s], f"{path} rows with {cfg.split_column}={s}")
             for s in SPLIT_NAMES if (splits == s).any()}
    if "train" not in parts:
        raise InputError("data.split_column", f"{path}: no row has {cfg.split_column}=train")
    return Source(parts)


def _read_image_folder(cfg: ImageFolderData) -> Source:
    """path/train/<class>/… with optional val/ and test/, or path/<class>/… (split by the fractions)."""
    path = data_path(cfg)
    if not path.is_dir():
        raise InputError("data.path", f"expected a folder of images, got the file {path}")
    if (path / "train").is_dir():
        given = {s: path / s for s in SPLIT_NAMES if (path / s).is_dir()}
    else:
        given = {"all": path}
    listings = {s: list_class_folders(folder) for s, folder in given.items()}
    first, classes = next(iter(listings.items()))
    for split, listing in listings.items():
        if listing.classes != classes.classes:
            only_here = sorted(set(listing.classes) - set(classes.classes))
            only_there = sorted(set(classes.classes) - set(listing.classes))
            raise InputError("data.path", f"{given[split]} has different classes from {given[first]}: "
                                          f"only in {split}: {only_here or 'none'}, only in {first}: {only_there or 'none'}")
    parts = {s: Part(ImageFiles(np.arange(len(lst.files)), lst.files), lst.labels, f"{given[s]} (image folders)")
             for s, lst in listings.items()}
    skipped = [str(p) for lst in listings.values() for p in lst.skipped]
    return Source(parts, classes.classes, skipped)


def _read_hf(cfg: HfData) -> Source:
    """A `datasets` dataset saved with save_to_disk (a Dataset, or a DatasetDict whose train/validation/test are
    the splits), or one parquet file. Read from local files only; nothing is downloaded."""
    try:
        import datasets
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("data.source", "source hf needs the datasets package: pip install 'kdpipe[hf]'") from None
    path = data_path(cfg)
    if path.is_file():
        try:
            table = pq.read_table(path, memory_map=True)
        except Exception as exc:  # pyarrow raises several types for a file that is not parquet
            raise InputError("data.path", f"cannot read {path} as parquet: {exc}") from None
        tables, files, features = {"all": table}, [path], {"all": _parquet_features(table)}
    else:
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise InputError("data.path", f"cannot load {path} with datasets.load_from_disk: {exc}") from None
        if isinstance(loaded, datasets.DatasetDict):
            unknown = sorted(set(loaded) - set(HF_SPLIT_NAMES))
            if unknown or "train" not in loaded:
                raise InputError("data.path", f"{path}: expected splits train and optionally validation and test, "
                                              f"got {', '.join(loaded)}")
            named = {HF_SPLIT_NAMES[k]: ds for k, ds in loaded.items()}
        else:
            named = {"all": loaded}
        tables = {s: ds.with_format("arrow")[:] for s, ds in named.items()}
        files = sorted({Path(f["filename"]) for ds in named.values() for f in ds.cache_files})
        features = {s: ds.features for s, ds in named.items()}
    parts, origins = {}, {}
    for split, table in tables.items():
        origin = origins[split] = str(path) if split == "all" else f"{path} split {split}"
        for key, column in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
            if column not in table.column_names:
                raise InputError(key, f"{origin} has no column '{column}' (columns: {', '.join(table.column_names)})")
        labels = table.column(cfg.label_column).to_numpy(zero_copy_only=False)
        images = ArrowImages(np.arange(len(table)), table.column(cfg.image_column), origin, files)
        parts[split] = Part(images, labels, f"{origin} (hf)")
    names = {split: _label_names(features[split], cfg.label_column) for split in tables}
    return Source(parts, _labels_by_name(parts, names, origins))


def _label_names(features, column: str) -> list[str] | None:
    """The class names of a ClassLabel column, from `datasets` Features or the dict a parquet file's metadata holds."""
    feature = features.get(column) if features else None
    return getattr(feature, "names", None) or (feature.get("names") if isinstance(feature, dict) else None)


def _label_kind(labels: np.ndarray, names: list[str] | None) -> str:
    if names is not None:
        return "ClassLabel names"
    return "strings" if labels.dtype.kind in "OUS" else "integers"


def _labels_by_name(parts: dict[str, Part], names: dict[str, list[str] | None], origins: dict[str, str]
                    ) -> list[str] | None:
    """Every split's labels turned into indices of the first split's classes by name, so a split whose ClassLabel
    lists the names in another order keeps its classes: ClassLabel names in their order, string labels numbered in
    sorted order. Integer labels without names stay as they are. A split whose labels are of another kind, or name
    other classes, is refused. Returns the class names (None for bare integers)."""
    first, *others = parts
    kinds = {split: _label_kind(part.y, names[split]) for split, part in parts.items()}
    for split in others:
        if kinds[split] != kinds[first]:
            raise InputError("data.label_column", f"{origins[split]}: labels are {kinds[split]}, but split {first}'s "
                                                  f"are {kinds[first]}; every split needs labels of one kind")
    if kinds[first] == "integers":
        return None
    labels = {split: _label_strings(part.y, names[split], origins[split]) for split, part in parts.items()}
    classes = names[first] or sorted(set(labels[first].tolist()))
    for split in others:
        if names[split] is not None and set(names[split]) != set(classes):
            raise InputError("data.label_column", f"{origins[split]}: its ClassLabel's classes differ from split "
                             f"{first}'s: only in {split}: {sorted(set(names[split]) - set(classes))}, "
                             f"only in {first}: {sorted(set(classes) - set(names[split]))}")
        unknown = sorted(set(labels[split].tolist()) - set(classes))
        if unknown:
            raise InputError("data.label_column", f"{origins[split]}: labels {unknown[:5]} never occur in split "
                                                  f"{first}, so no model trained on it could predict them")
    lookup = {name: i for i, name in enumerate(classes)}
    for split, part in parts.items():
        part.y = np.array([lookup[name] for name in labels[split].tolist()], dtype=np.int64)
    return classes


def _label_strings(labels: np.ndarray, names: list[str] | None, origin: str) -> np.ndarray:
    """Each label as its class name: a string label as it is, a ClassLabel index as the name it has there."""
    if names is None:
        return labels.astype(str)
    outside = labels[(labels < 0) | (labels >= len(names))]
    if len(outside):
        raise InputError("data.label_column", f"{origin}: label {outside[0]} is not one of its ClassLabel's "
                                              f"{len(names)} classes (0..{len(names) - 1})")
    return np.asarray(names)[labels]


def _parquet_features(table) -> dict | None:
    """The label names `datasets` records in a parquet file's metadata, as {column: {"names": [...]}}."""
    meta = (table.schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(meta)["info"]["features"] if meta else None
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class CifarLayout:
    """One CIFAR archive's files in its extracted folder, and the keys of its pickled dicts."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels: dict[str, tuple[bytes, bytes]]  # data.label → (the batches' label key, the meta's class-name key)


CIFAR_LAYOUTS = (
    CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                {"fine": (b"labels", b"label_names")}),
    CifarLayout("cifar-100-python", ("train",), ("test",), "meta",
                {"fine": (b"fine_labels", b"fine_label_names"), "coarse": (b"coarse_labels", b"coarse_label_names")}),
)
CIFAR_IMAGE = (3, 32, 32)  # a row of b"data": 3072 bytes, the red, green and blue 32×32 planes in row-major order


class _CifarUnpickler(pickle.Unpickler):
    """Only what the archive's pickles hold (dicts, lists, bytes, numpy arrays): unpickling anything else could run
    code from the file."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for name in ("_reconstruct", "scalar"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR archive holds")
        return super().find_class(module, name)


def _cifar_layout(path: Path) -> tuple[Path, CifarLayout]:
    """The extracted archive folder (`path` itself, or its cifar-10-batches-py/ or cifar-100-python/) and its layout."""
    if not path.is_dir():
        raise InputError("data.path", f"expected the folder of an extracted CIFAR python archive, got the file {path}")
    inside = [layout for layout in CIFAR_LAYOUTS if (path / layout.meta).is_file()]
    if inside:  # the meta file tells which archive a folder is: batches.meta CIFAR-10, meta CIFAR-100
        return path, inside[0]
    below = [layout for layout in CIFAR_LAYOUTS if (path / layout.folder).is_dir()]
    if len(below) > 1:
        raise InputError("data.path", f"{path} holds both {' and '.join(f'{b.folder}/' for b in below)}; set data.path "
                                      f"to the one to read")
    if not below:
        raise InputError("data.path", f"{path} holds no CIFAR python archive: expected cifar-10-batches-py/ "
                                      f"(data_batch_1..5, test_batch, batches.meta) or cifar-100-python/ (train, "
                                      f"test, meta), or one of those folders itself")
    return path / below[0].folder, below[0]


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    """A pickled dict of the archive with `keys` (bytes, as the original files hold them)."""
    if not path.is_file():
        raise InputError("data.path", f"{path} is missing: a CIFAR python archive has it")
    try:
        with path.open("rb") as handle:
            loaded = _CifarUnpickler(handle, encoding="bytes").load()
    except Exception as exc:  # a file that is not a pickle raises one of many types
        raise InputError("data.path", f"cannot read {path} as a CIFAR python archive file: {exc}") from None
    missing = [k for k in keys if not isinstance(loaded, dict) or k not in loaded]
    if missing:
        found = ", ".join(map(repr, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise InputError("data.path", f"{path}: expected a pickled dict with {', '.join(map(repr, keys))}; "
                                      f"missing {missing[0]!r} (found: {found or 'nothing'})")
    return loaded


def _cifar_batches(folder: Path, files: tuple[str, ...], label_key: bytes, classes: int) -> Part:
    """The images (N×3×32×32 uint8) and labels of the batch files, in order."""
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path, (b"data", label_key))
        try:
            data, y = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
        except (ValueError, TypeError) as exc:  # ragged or mixed lists
            raise InputError("data.path", f"{path}: expected b'data' and {label_key!r} as arrays ({exc})") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(CIFAR_IMAGE):
            raise InputError("data.path", f"{path}: expected b'data' as N×{np.prod(CIFAR_IMAGE)} uint8 rows, got "
                                          f"{data.dtype} of shape {data.shape}")
        if y.shape != (len(data),) or not np.issubdtype(y.dtype, np.integer) or ((y < 0) | (y >= classes)).any():
            raise InputError("data.path", f"{path}: expected {len(data)} labels {label_key!r} in 0..{classes - 1}")
        images.append(data.reshape(-1, *CIFAR_IMAGE))
        labels.append(y)
    return Part(np.concatenate(images), np.concatenate(labels), f"{folder} {', '.join(files)}")


def _read_cifar(cfg: CifarData) -> Source:
    """CIFAR-10/100's python archive as torchvision lays it out: the training batches (split by val_fraction) and
    the test batch as the test split; class names from the meta file."""
    folder, layout = _cifar_layout(data_path(cfg))
    if cfg.label not in layout.labels:
        raise InputError("data.label", f"{layout.folder} has only {', '.join(layout.labels)} labels, not {cfg.label}")
    label_key, names_key = layout.labels[cfg.label]
    meta_path = folder / layout.meta
    names = _unpickle(meta_path, (names_key,))[names_key]
    if not isinstance(names, list) or not names:
        raise InputError("data.path", f"{meta_path}: expected {names_key!r} as a list of class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    parts = {split: _cifar_batches(folder, files, label_key, len(classes))
             for split, files in (("train", layout.train), ("test", layout.test))}
    return Source(parts, classes)


# --- the sources registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceKind:
    """A value of `data.source`: its section (a DataConfig subclass, ArrayData or ImageData, whose `source` is
    Literal[NAME]) and `read(section) -> Source`."""

    config: type[DataConfig]
    read: Callable[[Any], Source]


BUILT_IN_SOURCES = {"digits": SourceKind(DigitsData, _read_digits), "npz": SourceKind(NpzData, _read_npz),
                    "csv": SourceKind(CsvData, _read_csv), "imagefolder": SourceKind(ImageFolderData, _read_image_folder),
                    "hf": SourceKind(HfData, _read_hf), "cifar": SourceKind(CifarData, _read_cifar)}
DEFAULT_SOURCE = "digits"


def _names_itself(name: str, value: Any) -> bool:
    if not (isinstance(value, SourceKind) and isinstance(value.config, type) and issubclass(value.config, DataConfig)):
        return False
    return typing.get_args(value.config.model_fields["source"].annotation) == (name,)


@functools.cache
def data_sources() -> dict[str, SourceKind]:
    """The built-in sources and the plugins' (entry points kdpipe.sources), loaded once."""
    sources = dict(BUILT_IN_SOURCES)
    for plugin in load_plugins("kdpipe.sources", sources, _names_itself,
                               "a kdpipe.data.sources.SourceKind whose config has source: Literal[its name]"):
        sources[plugin.name] = plugin.value
    return sources


@functools.cache
def data_sections() -> dict[str, type[DataConfig]]:
    """Each source's data section, its `augment` and `strong_augment` lists taking the registered augmentation
    steps."""
    step = augment_step_model({name: kind.params for name, kind in augment_steps().items()})
    augment = Field(default_factory=list, description=DataConfig.model_fields["augment"].description)
    strong = Field(default_factory=list, description=DataConfig.model_fields["strong_augment"].description)
    return {name: create_model(kind.config.__name__, __base__=kind.config, augment=(list[step], augment),
                               strong_augment=(list[step], strong))
            for name, kind in sorted(data_sources().items())}


@functools.cache
def data_union() -> Any:
    """The data section: a union of the sources' sections discriminated by `source`."""
    return Annotated[Union[tuple(data_sections().values())], Field(discriminator="source")]


def data_config(**values: Any) -> DataConfig:
    """A data section from plain data (source digits unless given); ValidationError when it is not one."""
    return TypeAdapter(data_union()).validate_python({"source": DEFAULT_SOURCE, **values})
