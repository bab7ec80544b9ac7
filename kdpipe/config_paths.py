"""Keys that hold local paths, marked by their type, and their resolution against a folder.

A field annotated `Annotated[Path | None, LocalPath("checkpoint")]` (or `EntryPointPath()`) holds a path that,
when relative, is taken against the pipeline file's folder (a --set value: the working directory) and must
exist. kdpipe.pipeline walks the raw file along the schema's types (`resolve_paths`) before validating it, so
wherever a section sits (teacher.model, student.model, a method's peers) its paths are found, and a not-found
error names the folder a relative path was taken in.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kdpipe.errors import InputError

# A key's location -> the folder its relative paths are taken in, and what that folder is (for errors).
BaseDir = Callable[[tuple], tuple[Path, str]]


def resolve_path(value: str | Path, base_dir: Path) -> Path:
    """A relative path taken relative to `base_dir`; an absolute one (or one starting with ~) as it is."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(Path(base_dir) / path))


def existing(value: str, key: str, noun: str, base_dir: Path, origin: str) -> Path:
    path = resolve_path(value, base_dir)
    if not path.exists():
        where = "" if Path(value).expanduser().is_absolute() else f" (resolved against {base_dir}, {origin})"
        raise InputError(key, f"{noun} not found: {value}{where}")
    return path


@dataclass(frozen=True)
class LocalPath:
    """A path that must exist, named `noun` in errors; with `prefix`, only a value starting with it (hf:DIR)."""

    noun: str
    prefix: str = ""

    def resolve(self, value: str, key: str, base_dir: Path, origin: str) -> str:
        if not value.startswith(self.prefix):
            return value
        return self.prefix + str(existing(value[len(self.prefix):], key, self.noun, base_dir, origin))


@dataclass(frozen=True)
class EntryPointPath:
    """'file.py:factory' (the file must exist) or 'module:factory' (the module is looked up in the folder first)."""

    def resolve(self, value: str, key: str, base_dir: Path, origin: str) -> str:
        module, sep, factory = value.rpartition(":")
        if sep and module.endswith(".py"):
            return f"{existing(module, key, 'entry-point file', base_dir, origin)}:{factory}"
        if sep and module and ":" not in module:  # FOLDER:module:factory
            return f"{base_dir}:{module}:{factory}"
        return value


def _opened(annotation: Any, metadata: list) -> tuple[list, list]:
    """The types `annotation` allows (Annotated and unions opened) and the metadata found on the way."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *more = typing.get_args(annotation)
        return _opened(inner, [*metadata, *more])
    if origin in (Union, types.UnionType):
        opened = [_opened(arg, []) for arg in typing.get_args(annotation)]
        return [k for kinds, _ in opened for k in kinds], [*metadata, *(m for _, more in opened for m in more)]
    return [annotation], [m for item in metadata for m in ([item, *item.metadata] if isinstance(item, FieldInfo)
                                                            else [item])]


def _model_for(kinds: list, value: dict, discriminator: str | None) -> type[BaseModel] | None:
    models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
    if discriminator is None:
        return models[0] if models else None
    tag = value.get(discriminator)
    return next((m for m in models if typing.get_args(m.model_fields[discriminator].annotation) == (tag,)), None)


def resolve_paths(annotation: Any, value: Any, loc: tuple, base: BaseDir, metadata: list | None = None,
                  discriminator: str | None = None) -> Any:
    """`value` (raw data of type `annotation`, found at `loc`) with every path its schema marks made absolute
    against the folder `base` gives for its location, after checking that it exists."""
    kinds, found = _opened(annotation, list(metadata or []))
    marker = next((m for m in found if isinstance(m, (LocalPath, EntryPointPath))), None)
    if marker is not None:
        return marker.resolve(value, ".".join(loc), *base(loc)) if isinstance(value, str) and value else value
    if isinstance(value, list):
        items = next((typing.get_args(k)[0] for k in kinds if typing.get_origin(k) is list and typing.get_args(k)), None)
        return value if items is None else [resolve_paths(items, v, (*loc, str(i)), base) for i, v in enumerate(value)]
    discriminator = discriminator or next((m.discriminator for m in found if isinstance(m, FieldInfo)
                                           and isinstance(m.discriminator, str)), None)
    model = _model_for(kinds, value, discriminator) if isinstance(value, dict) else None
    if model is None:
        return value
    fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
    return {k: resolve_paths(fields[k].annotation, v, (*loc, str(k)), base, fields[k].metadata,
                             fields[k].discriminator if isinstance(fields[k].discriminator, str) else None)
            if k in fields else v for k, v in value.items()}
