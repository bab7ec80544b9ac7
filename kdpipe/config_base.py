"""The base of every pipeline section: `Strict` models, the number types they share, and the registries a
caller passes in the validation context.

The schema knows nothing of the runtime: checks against what is installed (the model zoo, onnxruntime's
providers, ...) read registries that kdpipe.pipeline passes as `model_validate(raw, context=...)`; without
them (a section built in code) those checks are left to the part that uses the value.
"""

from __future__ import annotations

import contextvars
from collections.abc import Collection
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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


def known(info: ValidationInfo, registry: str) -> Collection[str] | None:
    """The names in `registry` of the validation context (kdpipe.pipeline.VALIDATION_CONTEXT); None when the
    caller passed none, and the check is left to the part that uses the value."""
    return (info.context or {}).get(registry)


def param(default: Any, *, low: float | None = None, high: float | None = None, log: bool = False,
          choices: list | None = None, when: dict[str, list] | None = None, description: str | None = None,
          **constraints: Any) -> Any:
    """A method parameter or a deployment setting: its default, its validation constraints, its default search
    range, and `when` it acts (`{"stages": [1]}`: only when the parameter stages is 1; a search draws it only
    there)."""
    extra: dict[str, Any] = {}
    if choices is not None:
        extra["search"] = {"choices": choices}
    elif low is not None and high is not None:
        extra["search"] = {"low": low, "high": high, "log": log}
    if when:
        extra["when"] = when
    return Field(default, json_schema_extra=extra or None, description=description, **constraints)


def _extra(params: type[BaseModel], name: str) -> dict[str, Any]:
    extra = params.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def search_space(params: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """The default search range of every parameter that declares one."""
    return {name: dict(_extra(params, name)["search"]) for name in params.model_fields if _extra(params, name).get("search")}


def active_conditions(params: type[BaseModel]) -> dict[str, dict[str, list]]:
    """Parameter -> {other parameter: the values under which it acts}, for the conditional parameters."""
    return {name: _extra(params, name)["when"] for name in params.model_fields if _extra(params, name).get("when")}
