"""The pipeline file: its top level, whose `distill` section is a union discriminated by `method`, loading,
and `--set` overrides.

Each registered method contributes one distill section, `{method: NAME, params: <its Params>, ...the shared
keys}`, so `kdpipe schema` documents every method's parameters with their types, defaults and search ranges,
and one validation pass checks a whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, create_model, model_validator

from kdpipe.config import (DataConfig, DistillBase, ExportConfig, NonNegativeInt, RegisterConfig, SearchConfig,
                           StudentConfig, TeacherConfig, ValidateConfig, Strict, _input_error)
from kdpipe.errors import InputError
from kdpipe.methods import get_method, registry
from kdpipe.search.space import resolve_space
from kdpipe.search.storage import mask_credentials

DEFAULT_METHOD = "kd"


def _distill_section(name: str, method_cls) -> type[DistillBase]:
    return create_model(
        f"Distill_{name.replace('+', '_')}", __base__=DistillBase,
        method=(Literal[name], Field(description=method_cls.summary)),
        params=(method_cls.Params, Field(default_factory=method_cls.Params,
                                         description=f"the parameters of '{name}' (`kdpipe methods` describes them)")),
    )


DISTILL_SECTIONS = {name: _distill_section(name, cls) for name, cls in sorted(registry().items())}
DistillConfig = Annotated[Union[tuple(DISTILL_SECTIONS.values())], Field(discriminator="method")]
_DISTILL = TypeAdapter(DistillConfig)


def distill_section(values: dict[str, Any]):
    """A distill section from plain data (e.g. the search's best method and params over the file's other keys)."""
    return _DISTILL.validate_python(values)


class Pipeline(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: NonNegativeInt = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=lambda: distill_section({"method": DEFAULT_METHOD}))
    export: ExportConfig = Field(default_factory=ExportConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    registry: RegisterConfig | None = Field(None, alias="register")
    search: SearchConfig | None = Field(None, description="an Optuna campaign over the method's parameters before distill")

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, raw: Any) -> Any:
        distill = raw.get("distill") if isinstance(raw, dict) else None
        if isinstance(distill, dict) and "method" not in distill:
            raw = {**raw, "distill": {"method": DEFAULT_METHOD, **distill}}
        return raw

    def with_method(self, method: str, params: dict[str, Any], optimizer: dict[str, Any] | None = None) -> Pipeline:
        """A copy distilling with `method` and `params` (and optimizer keys), the other distill keys kept."""
        distill = self.distill.model_dump(mode="json", exclude={"method", "params"})
        distill["optimizer"] = {**distill["optimizer"], **(optimizer or {})}
        return self.model_copy(update={"distill": distill_section({**distill, "method": method, "params": params})})

    def resolved(self) -> dict[str, Any]:
        """The pipeline as plain data with every default filled in, keyed as in the file, as a run records it
        (pipeline.yaml, MLflow params): a search storage's password is masked (the run's ledger keeps the real URL)."""
        data = self.model_dump(mode="json", by_alias=True)
        if self.search is not None and self.search.storage is not None:
            data["search"]["storage"] = mask_credentials(self.search.storage)
        return data


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
    return validate_pipeline(raw, base_dir=Path(path).parent)


def validate_pipeline(raw: dict[str, Any], base_dir: Path | None = None) -> Pipeline:
    """`base_dir`: the pipeline file's folder, against which relative paths in it resolve."""
    try:
        pipeline = Pipeline.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise _input_error(exc, Pipeline, ()) from None
    get_method(pipeline.distill.method).check_pipeline(pipeline)
    if pipeline.search is not None:
        resolve_space(pipeline)  # raises InputError naming the search.space key
    return pipeline


def json_schema() -> dict[str, Any]:
    return Pipeline.model_json_schema(by_alias=True)
