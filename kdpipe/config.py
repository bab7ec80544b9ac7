"""The pipeline file's sections other than data (kdpipe.config_data): models, training, distill, export,
validate, register and search.

The top level (`Pipeline`, whose `distill` section is discriminated by method) and loading live in
kdpipe.pipeline, above the methods; the sections here are below them, so methods can use them. Names of
installed things (zoo architectures, onnxruntime providers) are checked against registries kdpipe.pipeline
passes in the validation context (kdpipe.config_base.known).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator,
                      model_serializer, model_validator)
from pydantic_core import PydanticCustomError

from kdpipe.config_base import (NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Seed, Strict, known,
                                param)
from kdpipe.config_errors import describe, shown, suggest
from kdpipe.config_paths import EntryPointPath, LocalPath
from kdpipe.errors import InputError

MIN_TIMED_RUNS = 5  # percentiles from fewer calls say nothing; made even when the budget is spent
MULTISTEP_GAMMA = 0.1  # the published CIFAR recipe's decay (RepDistiller, mdistiller)
MULTISTEP_KEYS = ("milestones", "gamma")
AUTO_TEACHER_VIEWS = 8  # distill.teacher_views: auto records at most this many views per image (fewer epochs: one each)


class ModelConfig(Strict):
    arch: Annotated[str | None, LocalPath("model directory", prefix="hf:")] = Field(None, description="a zoo name (`kdpipe models` lists them), timm:NAME, torchvision:NAME "
                                                "(the vision extra; random init, load weights with `weights`), or "
                                                "hf:DIR (a local save_pretrained transformers image classifier)")
    entrypoint: Annotated[str | None, EntryPointPath()] = Field(None, description="'package.module:factory' or 'file.py:factory' returning an "
                                                     "nn.Module (runs user code; the module is looked up in the "
                                                     "pipeline file's folder first)")
    weights: Annotated[Path | None, LocalPath("weights file")] = Field(None, description="weights to load: .safetensors or a torch state dict (read "
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
    def _known_arch(cls, arch: str | None, info: ValidationInfo) -> str | None:
        zoo, prefixes = known(info, "architectures"), known(info, "model_libraries")
        if arch is None or zoo is None or prefixes is None or arch in zoo:
            return arch
        prefix, sep, name = arch.partition(":")
        if sep and f"{prefix}:" in prefixes:
            if not name:
                raise ValueError(f"'{arch}' names no model after '{prefix}:'")
            return arch
        if sep:
            raise ValueError(f"unknown model library '{prefix}:'{suggest(prefix + ':', prefixes)}; expected one of "
                             f"{', '.join(prefixes)}")
        raise ValueError(f"unknown arch '{arch}'{suggest(arch, zoo)}; expected one of {', '.join(sorted(zoo))}, "
                         f"or timm:NAME, torchvision:NAME, hf:DIR")


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = Field(
        True, description="sgd: Nesterov momentum (when momentum > 0). On by default as in the CIFAR distillation "
                          "recipes kdpipe's defaults follow; set false to port a plain-momentum recipe")
    weight_decay: NonNegativeFloat = 5.0e-4
    scheduler: Literal["cosine", "multistep", "none"] = Field(
        "cosine", description="after any warm-up: cosine to 0 over the epochs; multistep: the LR times gamma after "
                              "each of milestones (the CIFAR recipe: 150, 180, 210 of 240); none: constant")
    milestones: list[PositiveInt] | None = Field(
        None, description="multistep: the epochs after which the LR is multiplied by gamma, strictly increasing, "
                          "each within 1..epochs", json_schema_extra={"when": {"scheduler": ["multistep"]}})
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description=f"multistep: the LR factor at each milestone; null: {MULTISTEP_GAMMA}",
        json_schema_extra={"when": {"scheduler": ["multistep"]}})

    @field_validator("milestones", "gamma")
    @classmethod
    def _multistep_only(cls, value: Any, info: ValidationInfo) -> Any:
        scheduler = info.data.get("scheduler")
        if value is not None and scheduler not in (None, "multistep"):
            raise ValueError(f"acts only with scheduler multistep (scheduler is {scheduler}): remove it or set "
                             f"scheduler: multistep")
        return value

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[int] | None) -> list[int] | None:
        if milestones is not None and (not milestones or any(a >= b for a, b in zip(milestones, milestones[1:]))):
            raise ValueError(f"expected strictly increasing epochs, got {milestones}")
        return milestones

    @model_validator(mode="after")
    def _milestones_given(self) -> OptimizerConfig:
        if self.scheduler == "multistep" and self.milestones is None:
            raise ValueError("scheduler multistep needs milestones: the epochs after which the LR is multiplied by "
                             "gamma, e.g. [150, 180, 210]")
        return self

    @model_serializer(mode="wrap")
    def _multistep_keys_when_set(self, handler) -> dict[str, Any]:
        # Left out while unset, so the record, the resume digest and the teacher cache key of a pipeline without
        # multistep stay those of the release before it.
        return {k: v for k, v in handler(self).items() if k not in MULTISTEP_KEYS or v is not None}

    @property
    def decay_factor(self) -> float:
        """multistep's gamma, its default filled in."""
        return MULTISTEP_GAMMA if self.gamma is None else self.gamma


def check_milestones(optimizer: OptimizerConfig, epochs: int, key: str) -> None:
    """InputError naming `key` (…optimizer.milestones) when a milestone lies beyond the section's epochs."""
    beyond = [m for m in optimizer.milestones or [] if m > epochs]
    if beyond:
        raise InputError(key, f"expected epochs within 1..{epochs} (the section's epochs), got {beyond[0]} in "
                              f"{optimizer.milestones}")


class TrainConfig(Strict):
    epochs: NonNegativeInt = 30
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)


class TeacherConfig(Strict):
    model: ModelConfig
    checkpoint: Annotated[Path | None, LocalPath("checkpoint")] = Field(None, description="state dict to load; null: train the teacher (cached by content hash)")
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
    baseline: bool = Field(False, description="with seeds: also train the same student without distillation (method "
                                              "none) per seed; the report gives the gain over it")
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
    teacher_views: PositiveInt | Literal["auto"] = Field(
        "auto", description="augmented data with teacher_cache auto, for methods reading only the teacher's softmax "
                            "(kd): augmented views recorded per training image, scored once by the teacher and "
                            "replayed (one per image each epoch); auto: min(8, epochs), as views beyond the epochs "
                            "are never replayed")
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

    @property
    def views_per_image(self) -> int:
        """teacher_views resolved: `auto` is min(AUTO_TEACHER_VIEWS, epochs), at least one."""
        if self.teacher_views == "auto":
            return max(1, min(AUTO_TEACHER_VIEWS, self.epochs))
        return self.teacher_views

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _cache_switch(cls, value: Any) -> Any:
        # YAML reads an unquoted `off` as false.
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class Int8Budget(Strict):
    max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        ..., description="the most validation accuracy the static INT8 graph may lose against the FP32 graph (both "
                         "run with onnxruntime)")
    max_excluded_nodes: PositiveInt = Field(
        8, description="the most nodes kept in float, the most sensitive first, to bring the loss within the budget")


class ExportConfig(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    input: Literal["float", "uint8"] = Field(
        "float", description="float: the graph takes the data's float samples, scaled and normalized by the caller; "
                             "uint8 (8-bit image data only): decoded images N×C×H×W, 0-255, the graph doing the "
                             "scaling and normalization")
    dynamic_batch: bool = True
    atol: PositiveFloat = Field(1.0e-4, description="parity limit (max abs logit difference); validate.gates.parity_atol wins")
    # The settings a search may draw declare their default ranges (`export.quantize: auto` in search.space), and
    # `when` they act, as method parameters do (kdpipe.config_base.param).
    quantize: Literal["none", "dynamic", "static", "qat"] = param(
        "none", choices=["none", "dynamic", "static", "qat"],
        description="also build an INT8 model with onnxruntime's quantization (static: calibrated on the training "
                    "split); qat: static as well, and a student fine-tuned fake-quantized against the teacher")
    qat_epochs: PositiveInt = param(3, low=1, high=10, when={"quantize": ["qat"]},
                                    description="qat: epochs of fake-quantized fine-tuning with the method's loss")
    qat_lr: PositiveFloat | None = Field(None, description="qat: learning rate of the fine-tuning; null: a tenth of "
                                                           "distill.optimizer.lr (it starts from the trained student)")
    calibration_batches: PositiveInt = Field(8, description="static quantization: training batches (data.batch_size) to calibrate on")
    calibration_method: Literal["minmax", "percentile"] = param(
        "minmax", choices=["minmax", "percentile"], when={"quantize": ["static", "qat"]},
        description="static quantization: how onnxruntime sets each activation's range from the calibration batches: "
                    "minmax (the observed range) or percentile (the calibration_percentile of |x|, clipping outliers)")
    calibration_percentile: Annotated[float, Field(gt=50.0, le=100.0)] = param(
        99.999, low=99.9, high=99.9999, when={"calibration_method": ["percentile"]},
        description="calibration_method percentile: the percentile of |x| an activation range keeps")
    int8_weight_bits: Literal[7, 8] = Field(
        7, description="INT8 weights' range, every quantize mode: 7 ([-64, 64]) gives the same results on every CPU; "
                       "8 ([-128, 127]) a little more precision where the CPU multiplies uint8 by int8 exactly (VNNI, "
                       "ARM), but x86 CPUs without VNNI (AVX2-only, AVX-512 before Cascade Lake) saturate the sums "
                       "of those products in 16 bits and compute such a model wrongly")
    deliver: Literal["fp32", "int8", "best"] = Field(
        "fp32", description="the model validated against the gates and registered (int8 with quantize qat: the QAT "
                            "model); best: an INT8 model (with qat: the more accurate of static and QAT) only when it "
                            "passes every gate, is faster than FP32 at every batch size and loses at most "
                            "int8_max_accuracy_drop")
    int8_max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    int8_budget: Int8Budget | None = Field(
        None, description="static INT8 (with qat: its static comparison model) within an accuracy budget: when "
                          "full INT8 loses more, the nodes whose quantization costs the most validation accuracy are "
                          "kept in float; null: every quantizable node is quantized")

    @field_validator("int8_budget")
    @classmethod
    def _budget_needs_static(cls, budget: Int8Budget | None, info: ValidationInfo) -> Int8Budget | None:
        quantize = info.data.get("quantize")
        if budget is not None and quantize not in (None, "static", "qat"):
            raise ValueError(f"acts only with quantize static or qat (quantize is {quantize}): remove it or set "
                             f"quantize: static")
        return budget

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.deliver != "fp32" and self.quantize == "none":
            raise ValueError(f"deliver '{self.deliver}' needs an INT8 model: set quantize to dynamic, static or qat")
        return self

    @model_serializer(mode="wrap")
    def _budget_when_set(self, handler) -> dict[str, Any]:
        # Left out while unset, so the record and the resume digest of a pipeline without it stay those of the
        # release before it.
        return {k: v for k, v in handler(self).items() if k != "int8_budget" or v is not None}


BatchLimit = PositiveFloat | dict[PositiveInt, PositiveFloat] | None
# OpenVINO agreed with onnxruntime on every test image of the default pipeline's FP32 students (seeds 0-2) and on all
# but one of 359 of its static INT8 ones (0.9972: an image on the edge of two classes, which the two runtimes' INT8
# kernels round differently); 0.99 lets such images pass, not a real divergence.
RUNTIME_AGREEMENT_MIN = 0.99
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
    runtime_agreement_min: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        RUNTIME_AGREEMENT_MIN, description="each runtime of validate.runtimes besides onnxruntime: the share of test "
                                           "samples whose class the delivered model predicts there as onnxruntime "
                                           "does; null: no such gate")

    @model_serializer(mode="wrap")
    def _agreement_when_changed(self, handler) -> dict[str, Any]:
        # Left out at its default, so the record and the resume digest of a pipeline without it stay those of the
        # release before it.
        return {k: v for k, v in handler(self).items()
                if k != "runtime_agreement_min" or v != RUNTIME_AGREEMENT_MIN}


MAX_THREADS = 1024
Runtime = Literal["onnxruntime", "openvino"]
ONNXRUNTIME_ONLY = ["onnxruntime"]


class ValidateConfig(Strict):
    batch_sizes: list[Annotated[int, Field(gt=0, le=1 << 20)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    providers: Literal["auto"] | list[str] = Field(
        "auto", description="auto: TensorrtExecutionProvider, then CUDAExecutionProvider (both with IO binding), "
                            "where this onnxruntime has them, CPUExecutionProvider last; or a list in order of "
                            "preference")
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
    runtimes: list[Runtime] = Field(
        default_factory=lambda: list(ONNXRUNTIME_ONLY),
        description="the runtimes every model is measured with (accuracy, latency, size), each besides onnxruntime "
                    "with its own gates and its parity with onnxruntime; onnxruntime must be one of them: its "
                    "measurements choose the delivered model; openvino needs pip install 'kdpipe[openvino]'")
    gates: Gates = Field(default_factory=Gates)

    @field_validator("runtimes")
    @classmethod
    def _onnxruntime_and_distinct(cls, runtimes: list[str]) -> list[str]:
        if "onnxruntime" not in runtimes:
            raise ValueError(f"expected onnxruntime among them (its measurements choose the delivered model), got "
                             f"{shown(runtimes)}; e.g. [onnxruntime, openvino]")
        repeated = sorted(r for r, n in Counter(runtimes).items() if n > 1)
        if repeated:
            raise ValueError(f"expected distinct runtimes, got {repeated[0]} more than once")
        return runtimes

    @model_serializer(mode="wrap")
    def _runtimes_when_changed(self, handler) -> dict[str, Any]:
        # Left out while onnxruntime is the only one, so the record and the resume digest of a pipeline without it
        # stay those of the release before it.
        return {k: v for k, v in handler(self).items() if k != "runtimes" or v != ONNXRUNTIME_ONLY}

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, providers: str | list[str], info: ValidationInfo) -> str | list[str]:
        names = known(info, "providers")
        for name in [] if providers == "auto" or names is None else providers:
            if name not in names:
                raise ValueError(f"unknown execution provider '{name}'{suggest(name, names)}")
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
        raise InputError(key, describe(exc.errors()[0], BaseModel, ())) from None


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
