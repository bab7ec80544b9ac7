"""Pydantic models of the pipeline file, loading, `--set` overrides and one-line errors.

Every error raised from here is an `InputError` whose key is the dotted YAML
path, so the CLI can print `file: key: what was expected` and exit 2.
"""

from __future__ import annotations

import difflib
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
    arch: str | None = Field(None, description="zoo architecture: mlp, cnn, resnet")
    entrypoint: str | None = Field(None, description="'package.module:factory' returning an nn.Module (runs user code)")
    width: PositiveInt = 32
    depth: PositiveInt = 2
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


class ExportConfig(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    dynamic_batch: bool = True
    atol: PositiveFloat = 1.0e-4


class Gates(Strict):
    accuracy_min: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_accuracy_drop_vs_teacher: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    latency_p50_ms_max: PositiveFloat | dict[PositiveInt, PositiveFloat] | None = Field(
        None, description="a number applies to the smallest batch size; a mapping gives a limit per batch size"
    )


class ValidateConfig(Strict):
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 64])
    providers: list[str] = Field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    warmup: NonNegativeInt = 10
    runs: Annotated[int, Field(ge=50)] = 100
    threads: NonNegativeInt = Field(0, description="onnxruntime intra-op threads; 0: onnxruntime's default")
    gates: Gates = Field(default_factory=Gates)


class RegisterConfig(Strict):
    model_name: str = Field(min_length=1)
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")


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


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML so `8`, `true` and `[1, 64]` get their types."""
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
        node[parts[-1]] = value
    return raw


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    return validate_pipeline(raw)


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
        return f"unknown key{hint}; valid keys here: {', '.join(valid)}"
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
