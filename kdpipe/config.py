"""Pydantic models of the pipeline file, loading, `--set` overrides and one-line errors.

Every error raised from here is an `InputError` whose key is the dotted YAML
path, so the CLI can print `file: key: what was expected` and exit 2.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdpipe.errors import InputError
from kdpipe.onnx_runtime import MIN_TIMED_RUNS

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Seed = Annotated[int, Field(ge=0, lt=1 << 32)]  # numpy's and Optuna's samplers take seeds below 2**32


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataConfig(Strict):
    source: Literal["digits", "npz", "csv"] = "digits"
    path: Path | None = Field(None, description="data file for npz and csv sources")
    label_column: str = Field("label", description="csv: the column holding the class label")
    shape: list[PositiveInt] | None = Field(None, description="per-sample shape to reshape flat rows into, e.g. [1, 8, 8]")
    num_classes: PositiveInt | None = Field(None, description="number of classes; default: max label + 1")
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.2
    batch_size: PositiveInt = 64

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source != "digits" and self.path is None:
            raise ValueError(f"source '{self.source}' needs a 'path' to its data file")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 to leave training data")
        return self


class ModelConfig(Strict):
    arch: str | None = Field(None, description="zoo architecture: mlp, cnn, resnet")
    entrypoint: str | None = Field(None, description="'package.module:factory' returning an nn.Module (runs user code)")
    width: Annotated[int, Field(gt=0, le=16384)] = 32  # bounded: a width of 10^6 asks for terabytes
    depth: Annotated[int, Field(gt=0, le=1024)] = 2
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the factory")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.arch is None) == (self.entrypoint is None):
            raise ValueError("give exactly one of 'arch' (zoo) or 'entrypoint' (package.module:factory)")
        if self.entrypoint is not None and ":" not in self.entrypoint:
            raise ValueError(f"entrypoint must look like 'package.module:factory', got '{self.entrypoint}'")
        return self

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str | None) -> str | None:
        from kdpipe.models import ZOO

        if arch is not None and arch not in ZOO:
            raise ValueError(f"unknown arch '{arch}'{_suggest(arch, ZOO)}; expected one of {', '.join(sorted(ZOO))}")
        return arch


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: NonNegativeFloat = 0.9
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


class DistillConfig(Strict):
    method: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters; see `kdpipe methods`")
    epochs: NonNegativeInt = 30
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    taps: TapsConfig | None = Field(None, description="feature taps by module path (`kdpipe taps FILE` lists them)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype for training and the teacher pass: auto = bf16 on CUDA (fp16 where "
                            "bf16 is unsupported, with a gradient scaler), fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the trained model (pays a compile time up front)")
    teacher_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: the teacher's outputs are computed once and reused every epoch unless the inputs "
                            "are augmented or the method opts out; off: the teacher runs on every batch")
    teacher_cache_memory_mb: NonNegativeFloat = Field(
        2048.0, description="teacher outputs held in memory; larger ones are memory-mapped from the disk cache")

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from kdpipe.methods import registry

        if name not in registry():
            names = sorted(registry())
            raise ValueError(f"unknown method '{name}'{_suggest(name, names)}; expected one of {', '.join(names)}")
        return name

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
    dynamic_batch: bool = True
    atol: PositiveFloat = Field(1.0e-4, description="parity limit (max abs logit difference); validate.gates.parity_atol wins")
    quantize: Literal["none", "dynamic", "static"] = Field(
        "none", description="also build an INT8 model with onnxruntime's quantization (static: calibrated on the training split)")
    calibration_batches: PositiveInt = Field(8, description="static quantization: training batches (data.batch_size) to calibrate on")
    deliver: Literal["fp32", "int8", "best"] = Field(
        "fp32", description="the model validated against the gates and registered; best: INT8 only when it passes every "
                            "gate, is faster than FP32 at every batch size and loses at most int8_max_accuracy_drop")
    int8_max_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.deliver != "fp32" and self.quantize == "none":
            raise ValueError(f"deliver '{self.deliver}' needs an INT8 model: set quantize to dynamic or static")
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


class RegisterConfig(Strict):
    model_name: str = Field(min_length=1)
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")


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


class Pipeline(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: Seed = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    registry: RegisterConfig | None = Field(None, alias="register")
    search: SearchConfig | None = Field(None, description="an Optuna campaign over the method's parameters before distill")

    def resolved(self) -> dict[str, Any]:
        """The pipeline as plain data with every default filled in, keyed as in the file."""
        return self.model_dump(mode="json", by_alias=True)


# --- loading ------------------------------------------------------------------------------


MAX_FILE_BYTES = 1 << 20  # a pipeline file is a page of settings; anything larger is not one
MAX_DEPTH = 64  # nesting levels, counting what aliases pull in
MAX_NODES = 100_000  # values after expanding aliases (a "billion laughs" file expands to 10^9)
SHOWN_CHARS = 80  # an echoed value is cut to this length, so an error stays one readable line


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than MAX_DEPTH or holding more than MAX_NODES
    values once aliases are expanded. Sizes are counted as nodes are composed, before anything is built,
    so a file cannot make kdpipe recurse or allocate beyond those bounds."""

    def __init__(self, stream):
        super().__init__(stream)
        self._nesting = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded
        self._values = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        self._nesting += 1
        if self._nesting > MAX_DEPTH:
            raise _too_large(mark, f"nesting deeper than {MAX_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._nesting -= 1
        if id(node) not in self._measured:
            if alias:
                raise _too_large(mark, "an alias inside the value it names (a recursive structure)")
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
                node.value if isinstance(node, yaml.SequenceNode) else [])
            sizes = [self._measured[id(child)] for child in children]
            self._measured[id(node)] = (1 + sum(v for v, _ in sizes), 1 + max((d for _, d in sizes), default=0))
        values, depth = self._measured[id(node)]
        self._values += values if alias else 1
        if depth > MAX_DEPTH:
            raise _too_large(mark, f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded")
        if values > MAX_NODES or self._values > MAX_NODES:
            raise _too_large(mark, f"more than {MAX_NODES} values once aliases are expanded")
        return node


def _too_large(mark, problem: str) -> InputError:
    return InputError("", f"line {mark.line + 1}, column {mark.column + 1}: {problem}; a pipeline file cannot hold that")


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("", f"pipeline file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError("", f"expected a YAML pipeline file of at most {MAX_FILE_BYTES} bytes, this one has {size}")
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("", f"cannot read the pipeline file: {exc.strerror or exc}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError("", f"expected YAML text, got a binary file (a NUL byte at offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("", f"expected UTF-8 text, got byte 0x{data[exc.start]:02x} at offset {exc.start}") from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError("", f"YAML syntax error at {where}{problem}") from None
    if not isinstance(raw, dict):
        raise InputError("", f"expected a mapping of pipeline keys at the top level, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML so `8`, `true` and `[1, 64]` get their types."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError("--set", f"expected key.path=value, got {_shown(item)}")
        try:
            value = _parse_yaml(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(key, f"--set cannot descend into '{part}', which holds {_shown(child)}")
            node = child
        node[parts[-1]] = value
    return raw


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    raw = read_yaml(Path(path))
    method_in_file = (raw.get("distill") or {}).get("method") if isinstance(raw.get("distill"), dict) else None
    raw = apply_overrides(raw, overrides or [])
    _keep_params_of_overridden_method(raw, method_in_file, overrides or [])
    return validate_pipeline(raw)


def _keep_params_of_overridden_method(raw: dict[str, Any], method_in_file: str | None, overrides: list[str]) -> None:
    """`--set distill.method=X` alone: the file's params were written for its own method, so X keeps only those it
    declares (the rest of X's parameters take their defaults). Params given with --set are always validated whole."""
    distill = raw.get("distill")
    if not isinstance(distill, dict) or distill.get("method") == method_in_file:
        return
    if any(o.partition("=")[0].startswith("distill.params") for o in overrides):
        return
    from kdpipe.methods import registry

    method = registry().get(distill.get("method"))
    if method is not None and isinstance(distill.get("params"), dict):
        distill["params"] = {k: v for k, v in distill["params"].items() if k in method.Params.model_fields}


def validate_pipeline(raw: dict[str, Any]) -> Pipeline:
    try:
        pipeline = Pipeline.model_validate(raw)
    except ValidationError as exc:
        raise _input_error(exc, Pipeline, ()) from None
    from kdpipe.methods import get_method

    method = get_method(pipeline.distill.method)
    try:
        params = method.Params.model_validate(pipeline.distill.params)
    except ValidationError as exc:
        raise _input_error(exc, method.Params, ("distill", "params")) from None
    _check_numbers(pipeline.model_dump(by_alias=True, exclude={"distill": {"params"}}), ())
    _check_numbers(params.model_dump(), ("distill", "params"))
    _check_providers(pipeline.validation)
    pipeline.distill.params = params.model_dump(mode="json")
    method.check_pipeline(pipeline)
    if pipeline.search is not None:
        from kdpipe.search import resolve_space

        resolve_space(pipeline)  # raises InputError naming the search.space key
    return pipeline


INT64 = 1 << 63


def _check_numbers(value: Any, loc: tuple) -> None:
    """Reject NaN and infinities (no setting means anything with them) and integers beyond 64 bits (torch, numpy
    and onnxruntime overflow on them at run time) wherever the schema let them through, keys and lists included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(".".join(map(str, loc)), f"expected a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise InputError(".".join(map(str, loc)), f"expected an integer that fits in 64 bits, got {_shown(value)}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(k, loc)
            _check_numbers(v, (*loc, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_numbers(v, (*loc, i))


def _check_providers(cfg: ValidateConfig) -> None:
    """A listed provider this onnxruntime lacks: with require_provider the run could only fail, so it is bad input;
    otherwise `kdpipe check` and the run warn (provider_warnings) and validate falls back."""
    from kdpipe.onnx_runtime import missing_providers

    missing = missing_providers(cfg.providers)
    if missing and cfg.require_provider:
        raise InputError("validate.providers", f"{missing[0]} is not available in this onnxruntime and require_provider "
                                               "is true; use providers: auto, or install onnxruntime-gpu on a CUDA machine")


def provider_warnings(pipeline: Pipeline) -> list[str]:
    """One warning line per listed provider this onnxruntime lacks (validate will run without it)."""
    from kdpipe.onnx_runtime import missing_providers

    return [f"warning: validate.providers: {p} is not available in this onnxruntime; validate will fall back "
            "(providers: auto picks what is available without a warning)" for p in missing_providers(pipeline.validation.providers)]


# --- error messages -----------------------------------------------------------------------


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
    if origin in (Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys (by alias) of the mapping at `loc` inside `model`, for 'did you mean'."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
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
    key = ".".join(str(p) for p in prefix + loc)
    return InputError(key, _describe(err, model, loc))


def json_schema() -> dict[str, Any]:
    return Pipeline.model_json_schema(by_alias=True)
