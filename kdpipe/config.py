"""The sections of the pipeline file as pydantic models, and validation errors as one-line InputErrors.

The top level (`Pipeline`, whose `distill` section is discriminated by method) and loading live in
kdpipe.pipeline, above the methods; the sections here are below them, so methods can use them.
Every error is an `InputError` whose key is the dotted YAML path, so the CLI can print
`file: key: what was expected` and exit 2.
"""

from __future__ import annotations

import contextvars
import difflib
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_serializer, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from kdpipe.errors import InputError
from kdpipe.onnx_runtime import MIN_TIMED_RUNS

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Seed = Annotated[int, Field(ge=0, lt=1 << 32)]  # numpy's and Optuna's samplers take seeds below 2**32


_VALIDATING_SECTION = contextvars.ContextVar("kdpipe_validating_section", default=False)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="wrap")
    @classmethod
    def _no_boolean_as_number(cls, data: Any, handler) -> Any:
        # pydantic's lax mode reads true as 1; in a pipeline file a boolean where a number belongs is a slip.
        # The outermost model checks its whole input once it is validated: a nested one refusing would fail its
        # member of a union (normalize: imagenet | {mean, std}), and the union's error would hide which key it was.
        if _VALIDATING_SECTION.get():
            return handler(data)
        outermost = _VALIDATING_SECTION.set(True)
        try:
            model = handler(data)
        finally:
            _VALIDATING_SECTION.reset(outermost)
        taken = _boolean_taken_as_number(data, model)
        if taken is not None:
            loc, number = taken
            kind = "an integer" if isinstance(number, int) else "a number"
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("bool_as_number", f"expected {kind}, not a boolean"), loc=loc, input=True)])
        return model


def _boolean_taken_as_number(raw: Any, value: Any, loc: tuple = ()) -> tuple[tuple, int | float] | None:
    """Where validation turned a boolean of the input `raw` into a number of its result `value`, with that number:
    the first such place, followed through mappings, models and lists; None when there is none."""
    if isinstance(raw, bool):
        return (loc, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(raw, dict) and isinstance(value, BaseModel):
        fields = type(value).model_fields
        names = {**{n: n for n in fields}, **{f.alias: n for n, f in fields.items() if f.alias}}
        pairs = [(k, v, getattr(value, names[k])) for k, v in raw.items() if k in names]
    elif isinstance(raw, dict) and isinstance(value, dict):
        # Keys as well: a per-batch-size limit {true: 5} becomes {1: 5}.
        keys = [(k, k, next(key for key in value if key == k)) for k in raw if isinstance(k, bool) and k in value]
        pairs = keys + [(k, v, value[k]) for k, v in raw.items() if k in value]
    elif isinstance(raw, (list, tuple)) and isinstance(value, (list, tuple)) and len(raw) == len(value):
        pairs = list(zip(range(len(raw)), raw, value))
    else:
        return None
    for key, item, validated in pairs:
        found = _boolean_taken_as_number(item, validated, (*loc, key))
        if found is not None:
            return found
    return None


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


class AugmentStep(Strict):
    """One augmentation, written as a one-key mapping: `- hflip: {p: 0.5}` (or just `- hflip` for its defaults)."""

    random_crop: RandomCrop | None = None
    hflip: HorizontalFlip | None = None
    random_resized_crop: RandomResizedCrop | None = None
    color_jitter: ColorJitter | None = None

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


SPLIT_FRACTIONS = ("val_fraction", "test_fraction")


class DataConfig(Strict):
    source: Literal["digits", "npz", "csv", "imagefolder", "hf"] = "digits"
    path: Path | None = Field(None, description="npz/csv file; imagefolder: a folder with train/ (and optionally val/, "
                                                "test/) or class folders directly; hf: a dataset saved with "
                                                "save_to_disk or a parquet file. Relative to the pipeline file's folder")
    image_column: str = Field("image", description="hf: the column holding the images")
    label_column: str = Field("label", description="csv and hf: the column holding the class label")
    split_column: str | None = Field(None, description="csv: a column saying train, val or test for each row; "
                                                       "the splits are then used as given")
    shape: list[PositiveInt] | None = Field(None, description="per-sample shape to reshape flat rows into, e.g. [1, 8, 8]")
    layout: Literal["auto", "nchw", "nhwc"] = Field(
        "auto", description="npz: the layout of 4-d image arrays; auto tells it from the shape and refuses to guess")
    num_classes: PositiveInt | None = Field(None, description="number of classes; default: max label + 1 "
                                                              "(labels must then cover 0..max)")
    image_size: PositiveInt | list[PositiveInt] | None = Field(
        None, description="imagefolder and hf: int or [H, W]; images are resized (shorter side) and center-cropped "
                          "to it; null: every image must already have one size")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3: every image is converted to this; "
                                                            "null: 3 for imagefolder and hf, as stored for arrays")
    normalize: Literal["imagenet"] | Normalization | None = Field(
        None, description="{mean: [...], std: [...]} per channel, or imagenet; the same on every split")
    augment: list[AugmentStep] = Field(
        default_factory=list, description="training batches only, per sample on the training device: random_crop, "
                                          "hflip, random_resized_crop, color_jitter")
    storage: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decoded uint8 on the training device; stream: decoded by DataLoader workers "
                            "every epoch (data larger than memory); auto: memory when it fits")
    workers: Literal["auto"] | NonNegativeInt = Field("auto", description="image decoding processes; auto: one per "
                                                                         "CPU core, at most 8")
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.2
    batch_size: PositiveInt = 64

    @field_validator("image_size")
    @classmethod
    def _height_width(cls, size: int | list[int] | None) -> int | list[int] | None:
        if isinstance(size, list) and len(size) != 2:
            raise ValueError(f"expected an int or [height, width], got {size}")
        return size

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source != "digits" and self.path is None:
            raise ValueError(f"source '{self.source}' needs a 'path' to its data")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 to leave training data")
        if self.image_size is not None and self.source not in ("imagefolder", "hf"):
            raise ValueError(f"image_size applies to imagefolder and hf images, not to source '{self.source}'")
        if self.split_column is not None and self.source != "csv":
            raise ValueError("split_column applies to csv files")
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
    def size(self) -> tuple[int, int] | None:
        """image_size as (height, width)."""
        if self.image_size is None:
            return None
        return tuple(self.image_size) if isinstance(self.image_size, list) else (self.image_size, self.image_size)

    @property
    def normalization(self) -> tuple[list[float], list[float]] | None:
        if self.normalize is None:
            return None
        values = IMAGENET_NORMALIZATION if self.normalize == "imagenet" else self.normalize.model_dump()
        return values["mean"], values["std"]


class ModelConfig(Strict):
    arch: str | None = Field(None, description="a zoo name (`kdpipe models` lists them), timm:NAME, torchvision:NAME "
                                                "(the vision extra; random init, load weights with `weights`), or "
                                                "hf:DIR (a local save_pretrained transformers image classifier)")
    entrypoint: str | None = Field(None, description="'package.module:factory' or 'file.py:factory' returning an "
                                                     "nn.Module (runs user code; the module is looked up in the "
                                                     "pipeline file's folder first)")
    weights: Path | None = Field(None, description="weights to load: .safetensors or a torch state dict (read "
                                                   "weights-only; {state_dict|model: ...} wrappers and module. "
                                                   "prefixes accepted)")
    reset_head: bool = Field(False, description="replace the classifier when the weights' class count differs "
                                                "from the data's")
    # bounded: a width of 10^6 asks for terabytes
    width: Annotated[int, Field(gt=0, le=16384)] = Field(32, description="mlp, cnn, resnet only")
    depth: Annotated[int, Field(gt=0, le=1024)] = Field(2, description="mlp, cnn, resnet only")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the factory")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.arch is None) == (self.entrypoint is None):
            raise ValueError("give exactly one of 'arch' (zoo, timm:, torchvision:, hf:) or 'entrypoint' (package.module:factory)")
        if self.entrypoint is not None and ":" not in self.entrypoint:
            raise ValueError(f"entrypoint must look like 'package.module:factory', got '{self.entrypoint}'")
        return self

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str | None) -> str | None:
        from kdpipe.models import ZOO
        from kdpipe.models.external import PREFIXES

        if arch is None or arch in ZOO:
            return arch
        prefix, sep, name = arch.partition(":")
        if sep and f"{prefix}:" in PREFIXES:
            if not name:
                raise ValueError(f"'{arch}' names no model after '{prefix}:'")
            return arch
        if sep:
            raise ValueError(f"unknown model library '{prefix}:'{_suggest(prefix + ':', PREFIXES)}; expected one of "
                             f"{', '.join(PREFIXES)}")
        raise ValueError(f"unknown arch '{arch}'{_suggest(arch, ZOO)}; expected one of {', '.join(sorted(ZOO))}, "
                         f"or timm:NAME, torchvision:NAME, hf:DIR")


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = Field(
        True, description="sgd: Nesterov momentum (when momentum > 0). On by default as in the CIFAR distillation "
                          "recipes kdpipe's defaults follow; set false to port a plain-momentum recipe")
    weight_decay: NonNegativeFloat = 5.0e-4
    scheduler: Literal["cosine", "none"] = "cosine"


class TrainConfig(Strict):
    epochs: NonNegativeInt = 30
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)


class TeacherConfig(Strict):
    model: ModelConfig
    checkpoint: Path | None = Field(None, description="state dict to load; null: train the teacher (cached by content hash)")
    train: TrainConfig = Field(default_factory=TrainConfig)


class StudentConfig(Strict):
    model: ModelConfig


class TapsConfig(Strict):
    student: list[str] | None = Field(None, description="module paths to tap in the student; null: the method's default")
    teacher: list[str] | None = Field(None, description="module paths to tap in the teacher; null: the method's default")


class EMAConfig(Strict):
    decay: float = Field(0.9998, gt=0.0, lt=1.0, description="after every optimizer step ema = decay·ema + "
                                                             "(1 − decay)·weights (timm's model_ema_decay)")
    export: bool = Field(False, description="true: the EMA weights are validated, pick the best epoch and are "
                                            "exported; false: reported beside the raw ones (val_accuracy_ema)")


class DistillBase(Strict):
    """The distill keys every method shares; kdpipe.pipeline adds `method` and that method's `params`."""

    epochs: NonNegativeInt = 30
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    taps: TapsConfig | None = Field(None, description="feature taps by module path (`kdpipe taps FILE` lists them)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype for training and the teacher pass: auto = bf16 on CUDA (fp16 where "
                            "bf16 is unsupported, with a gradient scaler), fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the trained model (pays a compile time up front); on CUDA "
                                             "its steps replay as CUDA graphs. Trains on one batch shape: each epoch's "
                                             "last partial batch is dropped (report.json: distill.static_batches)")
    teacher_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: the teacher's outputs are computed once and reused every epoch unless the method "
                            "opts out; with augmented inputs, teacher views for methods reading only the teacher's "
                            "softmax (kd), the teacher online for the others; off: the teacher runs on every batch")
    teacher_cache_memory_mb: NonNegativeFloat = Field(
        2048.0, description="teacher outputs and teacher views held in memory together, least recently used "
                            "leaving first; an entry larger than this is memory-mapped from the disk cache")
    teacher_views: PositiveInt = Field(
        8, description="augmented data with teacher_cache auto, for methods reading only the teacher's softmax (kd): "
                       "augmented views recorded per training image, scored once by the teacher and replayed "
                       "(one per image each epoch)")
    teacher_topk: PositiveInt = Field(
        10, description="teacher views: classes whose probability is kept per view (clipped to the class count); "
                        "the rest of the mass is spread evenly over the other classes")
    # The student's training recipe beyond the optimizer (timm's names); the defaults leave each off.
    warmup_epochs: NonNegativeInt = Field(0, description="epochs of linear LR warm-up, step by step from "
                                                         "warmup_start_factor·lr to lr; the scheduler follows it")
    warmup_start_factor: float = Field(0.01, gt=0.0, le=1.0, description="the LR at the first warm-up step, as a "
                                                                         "fraction of optimizer.lr")
    clip_grad_norm: PositiveFloat | None = Field(None, description="clip each update's gradients to this global L2 "
                                                                  "norm (a loss spike then moves the weights by a "
                                                                  "bounded step); null: no clipping")
    grad_accum_steps: PositiveInt = Field(1, le=1024, description="batches whose gradients make one optimizer step: "
                                                                 "the step of one batch of grad_accum_steps·"
                                                                 "data.batch_size")
    filter_bias_and_bn: bool = Field(False, description="no weight decay on biases and normalization weights "
                                                        "(every parameter of one dimension)")
    ema: EMAConfig | None = Field(None, description="keep an exponential moving average of the student's weights; "
                                                    "null: none")

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got '{device}'")
        return device

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _cache_switch(cls, value: Any) -> Any:
        # YAML reads an unquoted `off` as false.
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class ExportConfig(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    input: Literal["float", "uint8"] = Field(
        "float", description="float: the graph takes the data's float samples, scaled and normalized by the caller; "
                             "uint8 (8-bit image data only): decoded images N×C×H×W, 0-255, the graph doing the "
                             "scaling and normalization")
    dynamic_batch: bool = True
    atol: PositiveFloat = Field(1.0e-4, description="parity limit (max abs logit difference); validate.gates.parity_atol wins")
    quantize: Literal["none", "dynamic", "static", "qat"] = Field(
        "none", description="also build an INT8 model with onnxruntime's quantization (static: calibrated on the training "
                            "split); qat: static as well, and a student fine-tuned fake-quantized against the teacher")
    qat_epochs: PositiveInt = Field(3, description="qat: epochs of fake-quantized fine-tuning with the method's loss",
                                    json_schema_extra={"when": {"quantize": ["qat"]}})  # a search draws it only there
    qat_lr: PositiveFloat | None = Field(None, description="qat: learning rate of the fine-tuning; null: a tenth of "
                                                           "distill.optimizer.lr (it starts from the trained student)")
    calibration_batches: PositiveInt = Field(8, description="static quantization: training batches (data.batch_size) to calibrate on")
    calibration_method: Literal["minmax", "percentile"] = Field(
        "minmax", description="static quantization: how onnxruntime sets each activation's range from the calibration "
                              "batches: minmax (the observed range) or percentile (the calibration_percentile of |x|, "
                              "clipping outliers)")
    calibration_percentile: Annotated[float, Field(gt=50.0, le=100.0)] = Field(
        99.999, description="calibration_method percentile: the percentile of |x| an activation range keeps",
        json_schema_extra={"when": {"calibration_method": ["percentile"]}})
    deliver: Literal["fp32", "int8", "best"] = Field(
        "fp32", description="the model validated against the gates and registered (int8 with quantize qat: the QAT "
                            "model); best: an INT8 model (with qat: the more accurate of static and QAT) only when it "
                            "passes every gate, is faster than FP32 at every batch size and loses at most "
                            "int8_max_accuracy_drop")
    int8_max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.deliver != "fp32" and self.quantize == "none":
            raise ValueError(f"deliver '{self.deliver}' needs an INT8 model: set quantize to dynamic, static or qat")
        return self


BatchLimit = PositiveFloat | dict[PositiveInt, PositiveFloat] | None
PER_BATCH = "a number applies to the smallest batch size; a mapping gives a limit per batch size"


class Gates(Strict):
    accuracy_min: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_accuracy_drop_vs_teacher: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    latency_p50_ms_max: BatchLimit = Field(None, description=PER_BATCH)
    latency_p99_ms_max: BatchLimit = Field(None, description=PER_BATCH)
    speedup_vs_teacher_min: BatchLimit = Field(
        None, description=f"teacher ONNX p50 / student ONNX p50 at the same batch size; {PER_BATCH}")
    parity_atol: PositiveFloat | None = Field(None, description="max abs logit difference ONNX vs PyTorch; null: export.atol")
    size_mb_max: PositiveFloat | None = Field(None, description="size of the delivered ONNX file in MB (10^6 bytes)")
    # On unless the pipeline names it: a model at chance is broken whatever the other gates say.
    above_chance: Annotated[float, Field(gt=0.0, le=0.05)] | None = Field(
        0.001, description="significance level: the teacher's and the delivered model's test accuracy must beat "
                           "always answering the most common test class (one-sided exact binomial test, p ≤ this); "
                           "a failing teacher ends the run before distillation; null: no such gate")


MAX_THREADS = 1024


class ValidateConfig(Strict):
    batch_sizes: list[Annotated[int, Field(gt=0, le=1 << 20)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    providers: Literal["auto"] | list[str] = Field(
        "auto", description="auto: CUDAExecutionProvider (with IO binding) when this onnxruntime has it, else "
                            "CPUExecutionProvider; or a list in order of preference")
    require_provider: bool = Field(False, description="every listed provider must be in use: `kdpipe check` rejects one "
                                                      "this onnxruntime lacks, and the gate fails one that cannot start")
    warmup: NonNegativeInt = 10
    runs: Annotated[int, Field(ge=MIN_TIMED_RUNS, le=1_000_000)] = Field(
        100, description="most timed calls per (model, batch size)")
    budget_s: PositiveFloat = Field(2.0, description=f"seconds of warm-up and timed calls per (model, batch size); "
                                                     f"at least {MIN_TIMED_RUNS} timed calls are made whatever it says")
    threads: Annotated[int, Field(ge=0, le=MAX_THREADS)] = Field(
        0, description="onnxruntime intra-op threads; 0: onnxruntime's default")
    inter_op_threads: Annotated[int, Field(ge=0, le=MAX_THREADS)] = Field(
        0, description="onnxruntime inter-op threads; 0: onnxruntime's default")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    gates: Gates = Field(default_factory=Gates)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, providers: str | list[str]) -> str | list[str]:
        from kdpipe.onnx_runtime import known_providers

        known = known_providers()
        for name in [] if providers == "auto" else providers:
            if known is not None and name not in known:
                raise ValueError(f"unknown execution provider '{name}'{_suggest(name, known)}")
        return providers

    @model_validator(mode="after")
    def _limits_name_validated_batch_sizes(self) -> ValidateConfig:
        for key in ("latency_p50_ms_max", "latency_p99_ms_max", "speedup_vs_teacher_min"):
            limit = getattr(self.gates, key)
            missing = sorted(set(limit) - set(self.batch_sizes)) if isinstance(limit, dict) else []
            if missing:
                raise ValueError(f"gates.{key} names batch size {missing[0]}, which is not in batch_sizes {self.batch_sizes}")
        return self


ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"  # kdpipe's rule (it names tags kdpipe.claim.ALIAS); MLflow's is wider
MLFLOW_MAX_ALIAS_LENGTH = 255
# What makes a registered model name unusable, and why; tests/test_strict_input.py holds it against a real registry.
MODEL_NAME_BREAKERS = {
    "/": "MLflow refuses it (models:/NAME/VERSION)",
    ":": "MLflow refuses it",
    "%": "MLflow's file store refuses it",
    "?": "it ends the name in a models:/ URI",
    "'": "it ends the quoted name in the registry searches kdpipe makes",
    "\t": "models:/ URIs drop it", "\n": "models:/ URIs drop it", "\r": "models:/ URIs drop it",
}


def _not_reserved_by_mlflow(alias: str) -> str:
    """MLflow refuses these aliases only when one is set, which is after training."""
    if alias.lower() == "latest":
        raise PydanticCustomError("reserved_alias", "'latest' (in any case) is reserved by MLflow for a model's newest "
                                                    "version")
    if re.fullmatch(r"[vV]\d+", alias):
        raise PydanticCustomError("reserved_alias", "v followed by digits is reserved by MLflow for version numbers "
                                                    "(@v3 is version 3)")
    return alias


def _usable_model_name(name: str) -> str:
    if not name.strip():
        raise PydanticCustomError("model_name", "expected a registered model name, not only spaces")
    if name == "." or name.startswith(".."):
        raise PydanticCustomError("model_name", "MLflow refuses a name that reads as a relative path ('.', or "
                                                "starting with '..')")
    for char, why in MODEL_NAME_BREAKERS.items():
        if char in name:
            raise PydanticCustomError("model_name", "{char} cannot be in a registered model name: {why}",
                                      {"char": repr(char), "why": why})
    return name


RegistryAlias = Annotated[str, Field(pattern=ALIAS_PATTERN, max_length=MLFLOW_MAX_ALIAS_LENGTH),
                          AfterValidator(_not_reserved_by_mlflow)]
_ALIAS = TypeAdapter(RegistryAlias)


def registry_alias(alias: str, key: str) -> str:
    """`alias` when it can name a registry alias, else InputError naming `key` (a command-line option)."""
    try:
        return _ALIAS.validate_python(alias)
    except ValidationError as exc:
        raise InputError(key, _describe(exc.errors()[0], BaseModel, ())) from None


class RegisterConfig(Strict):
    model_name: Annotated[str, Field(min_length=1), AfterValidator(_usable_model_name)]
    alias: RegistryAlias = "champion"


class RangeSpec(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> RangeSpec:
        if self.low >= self.high:
            raise ValueError(f"expected low < high, got low {self.low}, high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class ChoicesSpec(Strict):
    choices: list[str | bool | int | float | None] = Field(min_length=1)


Objective = Literal["val_accuracy", "latency_p50"]


class SearchConfig(Strict):
    trials: PositiveInt = Field(20, description="trials this worker runs (workers sharing a study add theirs up)")
    timeout: PositiveFloat | None = Field(None, description="seconds after which this worker starts no new trial")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] | None = Field(
        None, description="default: median; none when the objective is multi-objective (Optuna cannot prune those)")
    seed: Seed | None = Field(None, description="sampler seed; default: the pipeline's seed")
    objective: list[Objective] = Field(
        default_factory=lambda: ["val_accuracy"],
        description="val_accuracy, or [val_accuracy, latency_p50] for a Pareto search over accuracy and ONNX latency")
    # Entries are parsed against the method registry (kdpipe.search.resolve_space), which names the bad key.
    space: Literal["auto"] | dict[str, Any] = Field(
        "auto", description="auto: the method's declared ranges; or per parameter {low, high, log} | {choices} | auto; "
                            "`method: {choices: [...]}` searches the method, a block named after a method applies to it alone")
    storage: str | None = Field(None, description="null: a sqlite file in the run directory; sqlite:///…, postgresql://…, "
                                                  "or a file path (Optuna's journal file, for several workers on one machine)")
    study: str | None = Field(None, description="study name; default: the pipeline's name")
    heartbeat_seconds: PositiveInt = Field(30, description="RDB storages: a trial whose worker stops beating for twice this "
                                                           "long is failed and retried")
    retrain: bool = Field(False, description="retrain with the best parameters instead of reusing the best trial's checkpoint")

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if "val_accuracy" not in self.objective or len(set(self.objective)) != len(self.objective):
            raise ValueError(f"expected val_accuracy or [val_accuracy, latency_p50], got {self.objective}")
        if len(self.objective) > 1 and self.pruner not in (None, "none"):
            raise ValueError("Optuna cannot prune a multi-objective search: set pruner to none")
        return self

    @property
    def pruner_name(self) -> str:
        return self.pruner or ("median" if len(self.objective) == 1 else "none")


# --- error messages -----------------------------------------------------------------------


SHOWN_CHARS = 80  # an echoed value is cut to this length, so an error stays one readable line
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 3, 8, 8
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = _SHORT_REPR.maxother = SHOWN_CHARS


def _shown(value: Any) -> str:
    """repr(value) cut to SHOWN_CHARS; reprlib bounds the work too, whatever the size of `value`."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `X | None` or `Annotated[X, ...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated, list):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated):
        return [m for arg in typing.get_args(annotation) for m in _union_members(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _tag_of(member: type[BaseModel]) -> str | None:
    """The `method` literal of a discriminated union member (kdpipe.pipeline's distill sections)."""
    field = member.model_fields.get("method")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _strip_tags(model: type[BaseModel], loc: tuple) -> tuple[tuple, list[type[BaseModel] | None]]:
    """`loc` without the union tags pydantic inserts (distill.kd.params → distill.params), and the model at each step."""
    current: type[BaseModel] | None = model
    kept, models = [], []
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if current is None:
            kept.append(part)
            continue
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        kept.append(part)
        if field is None:
            current = None
            continue
        members = _union_members(field.annotation)
        tagged = {_tag_of(m): m for m in members if _tag_of(m) is not None}
        if tagged and parts and parts[0] in tagged:
            current = tagged[parts.pop(0)]
        else:
            current = _submodel(field.annotation)
        models.append(current)
    return tuple(kept), models


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys (by alias) of the mapping at `loc` (already stripped of tags) inside `model`, for 'did you mean'."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):  # an item of a list of models: the item's model
            continue
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        current = _submodel(field.annotation)
    return [f.alias or n for n, f in current.model_fields.items()] if current else []


def _describe(err: dict, model: type[BaseModel], loc: tuple) -> str:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    got = f", got {_shown(value)}"
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        hint = _suggest(str(loc[-1]), valid)
        return f"unknown key{hint}; valid keys here: {', '.join(valid)}" if valid else "unknown key; no keys are valid here"
    if kind == "missing":
        return "required key is missing"
    bounds = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"expected a value {bounds[kind]} {limit}{got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer{got}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number{got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false{got}"
    if kind == "union_tag_invalid":  # the distill section's method
        tag, expected = str(ctx.get("tag")), [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        return f"unknown method '{tag}'{_suggest(tag, expected)}; expected one of {', '.join(sorted(expected))}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping{got}"
    if kind == "list_type":
        return f"expected a list{got}"
    if kind == "string_pattern_mismatch":
        return f"expected a string matching {ctx.get('pattern')}{got}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][0].lower()}{err['msg'][1:]}{got}"


def _input_error(exc: ValidationError, model: type[BaseModel], prefix: tuple) -> InputError:
    """The first validation error as an InputError naming its dotted key."""
    errors = exc.errors()
    # A union reports one error per member; the first member's is the useful one.
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    stripped, _ = _strip_tags(model, loc)
    if err["type"] == "union_tag_invalid":
        stripped += (str(err.get("ctx", {}).get("discriminator", "")).strip("'"),)
    key = ".".join(str(p) for p in prefix + stripped)
    if err["type"] == "extra_forbidden":  # the keys valid beside the unknown one: those of the model holding it
        _, parents = _strip_tags(model, loc[:-1])
        owner = parents[-1] if parents and parents[-1] is not None else model
        return InputError(key, _describe(err, owner, (stripped[-1],)))
    return InputError(key, _describe(err, model, stripped))
