"""The data section: one model per source (the union discriminated by `source` is built from the sources
registry, kdpipe.data.sources), and the augmentation steps (one key per step of the augment registry,
kdpipe.data.augment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model, field_validator, model_serializer, model_validator

from kdpipe.config_base import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Strict
from kdpipe.config_paths import LocalPath

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
UnitInterval = Annotated[float, Field(gt=0.0, le=1.0)]


class Normalization(Strict):
    mean: list[float] = Field(min_length=1)
    std: list[PositiveFloat] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        return self


class RandomCrop(Strict):
    padding: NonNegativeInt = 4
    padding_mode: Literal["constant", "reflect", "replicate"] = "constant"


class HorizontalFlip(Strict):
    p: Probability = 0.5


class RandomResizedCrop(Strict):
    scale: tuple[UnitInterval, UnitInterval] = (0.08, 1.0)
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _check(self) -> RandomResizedCrop:
        if self.scale[0] > self.scale[1] or self.ratio[0] > self.ratio[1]:
            raise ValueError("expected [low, high] with low ≤ high for scale and ratio")
        return self


class ColorJitter(Strict):
    brightness: NonNegativeFloat = 0.0
    contrast: NonNegativeFloat = 0.0
    saturation: NonNegativeFloat = 0.0
    hue: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    p: Probability = 1.0


class RandAugmentSettings(Strict):
    """FixMatch-style RandAugment (kdpipe.data.strong): `ops` operations per image, each drawn with replacement
    from the 14 of FixMatch's list, each at a magnitude drawn uniformly from its range."""

    ops: Annotated[int, Field(ge=1, le=8)] = Field(2, description="operations applied per image (FixMatch: 2)")


class CutoutSettings(Strict):
    """A square of side U[0, max_fraction]·(image side) at a uniform centre (clipped at the border), filled with
    `fill` (kdpipe.data.strong)."""

    max_fraction: UnitInterval = Field(0.5, description="the largest side as a fraction of the image's shorter side")
    fill: list[Annotated[float, Field(ge=0.0, le=255.0)]] | None = Field(
        None, min_length=1, description="the fill as 8-bit values per channel; null: (125, 123, 114) for RGB, its "
                                        "gray (122.6) for one channel")


class AugmentStep(Strict):
    """One augmentation, written as a one-key mapping: `- hflip: {p: 0.5}` (or just `- hflip` for its defaults).
    Its keys, one per registered step, are added by `augment_step_model`."""

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {value: {}}
        if isinstance(value, dict):  # `- hflip:` with nothing after it reads as None: the defaults
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one(self) -> AugmentStep:
        if len(self.model_fields_set) != 1:
            raise ValueError(f"expected one augmentation per list item, one of {', '.join(type(self).model_fields)}")
        return self

    @model_serializer(mode="wrap")
    def _as_written(self, handler) -> dict[str, Any]:
        # Written back as the one-key mapping it was read from: the three unused keys would make it unreadable.
        return {self.name: handler(self)[self.name]}

    @property
    def name(self) -> str:
        return next(iter(self.model_fields_set))

    @property
    def params(self) -> BaseModel:
        return getattr(self, self.name)


def augment_step_model(steps: dict[str, type[BaseModel]]) -> type[AugmentStep]:
    """The AugmentStep whose keys are the registered steps, each taking its parameters model."""
    return create_model("AugmentStep", __base__=AugmentStep,
                        **{name: (params | None, None) for name, params in steps.items()})


SPLIT_FRACTIONS = ("val_fraction", "test_fraction")
DataPath = Annotated[Path, LocalPath("data file")]


class DataConfig(Strict):
    """The keys every source shares; a source's section adds `source: Literal[NAME]` and its own keys."""

    source: str
    num_classes: PositiveInt | None = Field(None, description="number of classes; default: max label + 1 "
                                                              "(labels must then cover 0..max)")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3: every image is converted to this; "
                                                            "null: 3 for imagefolder and hf, as stored for arrays")
    normalize: Literal["imagenet"] | Normalization | None = Field(
        None, description="{mean: [...], std: [...]} per channel, or imagenet; the same on every split")
    augment: list[AugmentStep] = Field(
        default_factory=list, description="training batches only, per sample on the training device: random_crop, "
                                          "hflip, random_resized_crop, color_jitter, randaugment, cutout, or a "
                                          "plugin's steps")
    strong_augment: list[AugmentStep] = Field(
        default_factory=list, description="a second, strongly augmented view of each training image for the methods "
                                          "that read two (mlkd): these steps run after `augment`'s on a view of its "
                                          "own: randaugment, cutout, or any augment step")
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.2
    batch_size: PositiveInt = 64

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 to leave training data")
        if isinstance(self.normalize, Normalization) and self.channels and len(self.normalize.mean) != self.channels:
            raise ValueError(f"normalize has {len(self.normalize.mean)} values per statistic for {self.channels} channels")
        return self

    @model_serializer(mode="wrap")
    def _fractions_as_given(self, handler) -> dict[str, Any]:
        # A split fraction is written only when given: a default one applies only where the data give no such split
        # (report.json's data.provenance says how each split was made), and where they give it, a fraction that is
        # written is refused when read again, so the record of such a run could not be resumed.
        return {k: v for k, v in handler(self).items() if k not in SPLIT_FRACTIONS or k in self.model_fields_set}

    @property
    def input_key(self) -> str:
        """The key an error about the data's content names: the file or folder they were read from, if any."""
        return "data.path" if "path" in type(self).model_fields else "data"

    @property
    def normalization(self) -> tuple[list[float], list[float]] | None:
        if self.normalize is None:
            return None
        values = IMAGENET_NORMALIZATION if self.normalize == "imagenet" else self.normalize.model_dump()
        return values["mean"], values["std"]


class ArrayData(DataConfig):
    """Sources of numeric arrays (features, or images as numbers)."""

    shape: list[PositiveInt] | None = Field(None, description="per-sample shape to reshape flat rows into, e.g. [1, 8, 8]")
    layout: Literal["auto", "nchw", "nhwc"] = Field(
        "auto", description="the layout of 4-d image arrays; auto tells it from the shape and refuses to guess")


class ImageData(DataConfig):
    """Sources of image files, decoded by kdpipe."""

    image_size: PositiveInt | list[PositiveInt] | None = Field(
        None, description="int or [H, W]; images are resized (shorter side) and center-cropped to it; null: every "
                          "image must already have one size")
    storage: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decoded uint8 on the training device; stream: decoded by DataLoader workers "
                            "every epoch (data larger than memory); auto: memory when it fits")
    workers: Literal["auto"] | NonNegativeInt = Field("auto", description="image decoding processes; auto: one per "
                                                                         "CPU core, at most 8")

    @field_validator("image_size")
    @classmethod
    def _height_width(cls, size: int | list[int] | None) -> int | list[int] | None:
        if isinstance(size, list) and len(size) != 2:
            raise ValueError(f"expected an int or [height, width], got {size}")
        return size

    @property
    def size(self) -> tuple[int, int] | None:
        """image_size as (height, width)."""
        if self.image_size is None:
            return None
        return tuple(self.image_size) if isinstance(self.image_size, list) else (self.image_size, self.image_size)


class DigitsData(ArrayData):
    source: Literal["digits"] = Field("digits", description="scikit-learn's 8×8 digits, built in")


class NpzData(ArrayData):
    source: Literal["npz"] = Field(description="an .npz file with arrays x, y (optionally x_val, y_val, x_test, y_test)")
    path: DataPath = Field(description="the .npz file, relative to the pipeline file's folder")


class CsvData(ArrayData):
    source: Literal["csv"] = Field(description="a csv file with a header, one sample per row")
    path: DataPath = Field(description="the csv file, relative to the pipeline file's folder")
    label_column: str = Field("label", description="the column holding the class label")
    split_column: str | None = Field(None, description="a column saying train, val or test for each row; "
                                                       "the splits are then used as given")


class ImageFolderData(ImageData):
    source: Literal["imagefolder"] = Field(description="a folder of class folders of images")
    path: DataPath = Field(description="a folder with train/ (and optionally val/, test/) or class folders directly; "
                                       "relative to the pipeline file's folder")


class HfData(ImageData):
    source: Literal["hf"] = Field(description="a local `datasets` dataset (the hf extra)")
    path: DataPath = Field(description="a dataset saved with save_to_disk or a parquet file, relative to the "
                                       "pipeline file's folder")
    image_column: str = Field("image", description="the column holding the images")
    label_column: str = Field("label", description="the column holding the class label")


class CifarData(DataConfig):
    source: Literal["cifar"] = Field(description="CIFAR-10 or CIFAR-100 as its python archive, extracted "
                                                 "(torchvision's layout); its test batch is the test split")
    path: DataPath = Field(description="the folder holding cifar-10-batches-py/ or cifar-100-python/, or that folder "
                                       "itself; relative to the pipeline file's folder")
    label: Literal["fine", "coarse"] = Field("fine", description="CIFAR-100: the 100 fine classes or the 20 coarse "
                                                                 "superclasses; CIFAR-10 has only its 10 (fine)")
