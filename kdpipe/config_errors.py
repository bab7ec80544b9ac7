"""Pydantic validation errors as kdpipe's one-line `InputError(dotted.key, message)`.

The key is the dotted YAML path (union tags that pydantic inserts removed), the message says what was expected
and echoes a shortened value, so the CLI can print `file: key: what was expected` and exit 2.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from kdpipe.errors import InputError

SHOWN_CHARS = 80  # an echoed value is cut to this length, so an error stays one readable line
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 3, 8, 8
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = _SHORT_REPR.maxother = SHOWN_CHARS


def shown(value: Any) -> str:
    """repr(value) cut to SHOWN_CHARS; reprlib bounds the work too, whatever the size of `value`."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `X | None` or `Annotated[X, ...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated, list):
        for arg in typing.get_args(annotation):
            found = submodel(arg)
            if found is not None:
                return found
    return None


def union_members(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated):
        return [m for arg in typing.get_args(annotation) for m in union_members(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _tag_of(member: type[BaseModel], discriminator: str | None) -> str | None:
    """The tag of a discriminated union member: the one value its discriminator field (method, source) takes."""
    field = member.model_fields.get(discriminator) if discriminator else None
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _strip_tags(model: type[BaseModel], loc: tuple) -> tuple[tuple, list[type[BaseModel] | None], list[dict]]:
    """`loc` without the union tags pydantic inserts (distill.kd.params → distill.params), the model at each step,
    and at each step the members of the discriminated union it chose from ({} where there was none)."""
    current: type[BaseModel] | None = model
    kept, models, unions = [], [], []
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
        members = union_members(field.annotation)
        tagged = {_tag_of(m, field.discriminator): m for m in members if _tag_of(m, field.discriminator) is not None}
        if tagged and parts and parts[0] in tagged:
            current = tagged[parts.pop(0)]
        else:
            tagged, current = {}, submodel(field.annotation)
        models.append(current)
        unions.append(tagged)
    return tuple(kept), models, unions


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
        current = submodel(field.annotation)
    return [f.alias or n for n, f in current.model_fields.items()] if current else []


def describe(err: dict, model: type[BaseModel], loc: tuple) -> str:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    got = f", got {shown(value)}"
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        hint = suggest(str(loc[-1]), valid)
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
    if kind == "union_tag_invalid":  # the distill section's method, the data section's source
        tag, expected = str(ctx.get("tag")), [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        noun = str(ctx.get("discriminator", "")).strip("'")
        return f"unknown {noun} '{tag}'{suggest(tag, expected)}; expected one of {', '.join(sorted(expected))}"
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


def _elsewhere(key: str, owner: type[BaseModel], members: dict[str, type[BaseModel]]) -> str | None:
    """For a key unknown to `owner`, the chosen member of a discriminated union: which members take it, if any."""
    takes = [tag for tag, member in members.items() if member is not owner and key in _fields_at(member, ())]
    if not takes:
        return None
    noun, tag = next((n, typing.get_args(f.annotation)[0]) for n, f in owner.model_fields.items()
                     if typing.get_args(f.annotation) and members.get(typing.get_args(f.annotation)[0]) is owner)
    return (f"{key} applies to {noun} {', '.join(sorted(takes))}, not to {noun} '{tag}'; valid keys here: "
            f"{', '.join(_fields_at(owner, ()))}")


def input_error(exc: ValidationError, model: type[BaseModel], prefix: tuple) -> InputError:
    """The first validation error as an InputError naming its dotted key."""
    errors = exc.errors()
    # A union reports one error per member; the first member's is the useful one.
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    stripped, _, _ = _strip_tags(model, loc)
    if err["type"] == "union_tag_invalid":
        stripped += (str(err.get("ctx", {}).get("discriminator", "")).strip("'"),)
    key = ".".join(str(p) for p in prefix + stripped)
    if err["type"] == "extra_forbidden":  # the keys valid beside the unknown one: those of the model holding it
        _, parents, unions = _strip_tags(model, loc[:-1])
        owner = parents[-1] if parents and parents[-1] is not None else model
        elsewhere = _elsewhere(str(stripped[-1]), owner, unions[-1]) if unions else None
        return InputError(key, elsewhere or describe(err, owner, (stripped[-1],)))
    return InputError(key, describe(err, model, stripped))
