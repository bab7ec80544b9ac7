"""Pydantic models of the pipeline file, loading, `--set` overrides and one-line errors.

Every error raised from here is an `InputError` whose key is the dotted YAML
path, so the CLI can print `file: key: what was expected` and exit 2.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdpipe.errors import InputError

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


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
    width: PositiveInt = Field(32, description="mlp, cnn, resnet only")
    depth: PositiveInt = Field(2, description="mlp, cnn, resnet only")
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
    input: Literal["float", "uint8"] = Field(
        "float", description="float: the graph takes the data's float samples; uint8: decoded images N×C×H×W, "
                             "the graph does the scaling and normalization (kdpipe.models.adapter.InputAdapter)")
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


class ValidateConfig(Strict):
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 64], min_length=1)
    providers: list[str] = Field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    require_provider: bool = Field(False, description="fail the gate when a requested provider is not the one in use")
    warmup: NonNegativeInt = 10
    runs: Annotated[int, Field(ge=50)] = 100
    threads: NonNegativeInt = Field(0, description="onnxruntime intra-op threads; 0: onnxruntime's default")
    inter_op_threads: NonNegativeInt = Field(0, description="onnxruntime inter-op threads; 0: onnxruntime's default")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    gates: Gates = Field(default_factory=Gates)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, providers: list[str]) -> list[str]:
        from kdpipe.onnx_runtime import known_providers

        known = known_providers()
        for name in providers:
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
    seed: NonNegativeInt | None = Field(None, description="sampler seed; default: the pipeline's seed")
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
    seed: NonNegativeInt = 0
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


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("", f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError("", f"YAML syntax error at {where}{problem}") from None
    if not isinstance(raw, dict):
        raise InputError("", f"expected a mapping of pipeline keys at the top level, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], base_dir: Path | None = None) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML so `8`, `true` and `[1, 64]` get their types.
    With `base_dir`, relative paths in the values resolve against it (the working directory, for --set)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError("--set", f"expected key.path=value, got '{item}'")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(key, f"--set cannot descend into '{part}', which holds {child!r}")
            node = child
        if base_dir is not None:
            value = resolve_paths(value, tuple(parts), base_dir, "the working directory (--set)")
        node[parts[-1]] = value
    return raw


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    raw = read_yaml(Path(path))
    method_in_file = (raw.get("distill") or {}).get("method") if isinstance(raw.get("distill"), dict) else None
    raw = resolve_paths(raw, (), Path(path).resolve().parent, "the pipeline file's folder")
    raw = apply_overrides(raw, overrides or [], Path.cwd())
    _keep_params_of_overridden_method(raw, method_in_file, overrides or [])
    return validate_pipeline(raw)


# --- paths ----------------------------------------------------------------------------------

FILE_KEYS = {("data", "path"): "data file", ("teacher", "checkpoint"): "checkpoint"}
MODEL_SECTIONS = [("teacher", "model"), ("student", "model"), ("distill", "params", "peers", "*")]


def resolve_path(value: str | Path, base_dir: Path) -> Path:
    """A relative path taken relative to `base_dir`; an absolute one (or one starting with ~) as it is."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(Path(base_dir) / path))


def _in_model_section(loc: tuple) -> bool:
    return any(len(loc) == len(s) + 1 and all(p == "*" or p == q for p, q in zip(s, loc)) for s in MODEL_SECTIONS)


def _existing(value: str, key: str, noun: str, base_dir: Path, origin: str) -> Path:
    path = resolve_path(value, base_dir)
    if not path.exists():
        where = "" if Path(value).expanduser().is_absolute() else f" (resolved against {base_dir}, {origin})"
        raise InputError(key, f"{noun} not found: {value}{where}")
    return path


def resolve_paths(value: Any, loc: tuple, base_dir: Path, origin: str) -> Any:
    """`value` (found at dotted location `loc`) with every path it holds made absolute against `base_dir`:
    data.path, teacher.checkpoint, and in each model section weights, hf:DIR and the entry point's module.
    Inputs that must exist are checked here, so a not-found error names the folder a relative path was taken in.
    `origin` says what that folder is."""
    key = ".".join(loc)
    if isinstance(value, dict):
        return {k: resolve_paths(v, (*loc, str(k)), base_dir, origin) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_paths(v, (*loc, str(i)), base_dir, origin) for i, v in enumerate(value)]
    if not isinstance(value, str) or not value:
        return value
    if loc in FILE_KEYS:
        return str(_existing(value, key, FILE_KEYS[loc], base_dir, origin))
    if not _in_model_section(loc):
        return value
    if loc[-1] == "weights":
        return str(_existing(value, key, "weights file", base_dir, origin))
    if loc[-1] == "arch" and value.startswith("hf:"):
        return "hf:" + str(_existing(value[3:], key, "model directory", base_dir, origin))
    if loc[-1] == "entrypoint" and ":" in value:
        module, _, factory = value.rpartition(":")
        if module.endswith(".py"):
            return f"{_existing(module, key, 'entry-point file', base_dir, origin)}:{factory}"
        if ":" not in module:  # FOLDER:module:factory: the folder the module is looked up in first
            return f"{base_dir}:{module}:{factory}"
    return value


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
    pipeline.distill.params = params.model_dump(mode="json")
    method.check_pipeline(pipeline)
    if pipeline.search is not None:
        from kdpipe.search import resolve_space

        resolve_space(pipeline)  # raises InputError naming the search.space key
    return pipeline


# --- error messages -----------------------------------------------------------------------


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
    got = f", got {value!r}"
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
