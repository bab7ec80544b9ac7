"""The search space: which methods and parameters a campaign searches, from the pipeline file's `search.space`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kdpipe.config import ChoicesSpec, OptimizerConfig, RangeSpec, _input_error, _suggest
from kdpipe.errors import InputError
from kdpipe.methods import active_conditions, get_method, registry, search_space

OPTIMIZER = "optimizer."  # space keys naming distill.optimizer settings (lr, momentum, weight_decay, ...)


@dataclass
class Choice:
    """What one trial trains with."""

    method: str
    params: dict[str, Any]  # the method's full parameters
    optimizer: dict[str, Any]  # the distill.optimizer keys the search sets


@dataclass
class SearchSpace:
    methods: list[str]  # candidate methods; the pipeline's own method alone when the method is not searched
    method_searched: bool
    dims: dict[str, dict[str, dict[str, Any]]]  # method -> parameter -> {low, high, log} | {choices}
    base: dict[str, dict[str, Any]]  # method -> its parameters outside the search
    optimizer: dict[str, dict[str, Any]]  # distill.optimizer key -> range, shared by every method

    def key(self, method: str, param: str) -> str:
        """Optuna's parameter name: prefixed by the method when the method is searched, so each keeps its own space."""
        return f"{method}.{param}" if self.method_searched else param

    def suggest(self, trial) -> Choice:
        method = trial.suggest_categorical("method", self.methods) if self.method_searched else self.methods[0]
        fields = get_method(method).Params.model_fields
        values = dict(self.base[method])
        conditions = active_conditions(get_method(method).Params)
        # Unconditional parameters first: a conditional one is drawn only where its condition holds.
        for name in sorted(self.dims[method], key=lambda n: n in conditions):
            if all(values[other] in allowed for other, allowed in conditions.get(name, {}).items()):
                values[name] = _draw(trial, self.key(method, name), self.dims[method][name],
                                     fields[name].annotation is int)
        optimizer = {name: _draw(trial, OPTIMIZER + name, spec, False) for name, spec in self.optimizer.items()}
        return Choice(method, values, optimizer)

    def decode(self, flat: dict[str, Any]) -> Choice:
        """What a trial trained with, from its Optuna parameters."""
        method = flat.get("method", self.methods[0])
        values = dict(self.base[method])
        values.update({name: flat[self.key(method, name)] for name in self.dims[method] if self.key(method, name) in flat})
        return Choice(method, values, {name: flat[OPTIMIZER + name] for name in self.optimizer if OPTIMIZER + name in flat})

    def grid(self) -> dict[str, list]:
        grid = {self.key(m, p): spec["choices"] for m, dims in self.dims.items() for p, spec in dims.items()}
        return grid | {OPTIMIZER + name: spec["choices"] for name, spec in self.optimizer.items()}


def _draw(trial, key: str, spec: dict[str, Any], integer: bool) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    if integer:
        return trial.suggest_int(key, math.ceil(spec["low"]), math.floor(spec["high"]), log=spec["log"])
    return trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])


def resolve_space(pipeline) -> SearchSpace:
    """The campaign's search space, checked against the method registry; raises InputError naming the key."""
    search = pipeline.search
    own = pipeline.distill.method
    entries = {} if search.space == "auto" else {k: _parse_spec(v, f"search.space.{k}") for k, v in search.space.items()}
    method_spec = entries.pop("method", None)
    if method_spec is None:
        methods = [own]
    else:
        methods = _candidate_methods(method_spec, pipeline)
    known = registry()
    blocks = {name: entries.pop(name) for name in list(entries) if name in known}
    optimizer_base = pipeline.distill.optimizer.model_dump(mode="json")
    optimizer = {name[len(OPTIMIZER):]: _resolve_spec(OptimizerConfig, None, "distill.optimizer", name[len(OPTIMIZER):],
                                                      entries.pop(name), f"search.space.{name}", optimizer_base)
                 for name in list(entries) if name.startswith(OPTIMIZER)}
    for name in blocks:
        if name not in methods:
            raise InputError(f"search.space.{name}", f"method '{name}' is not searched (candidates: {', '.join(methods)})")

    dims: dict[str, dict[str, dict[str, Any]]] = {}
    base: dict[str, dict[str, Any]] = {}
    for m in methods:
        params_cls = get_method(m).Params
        base[m] = pipeline.distill.params.model_dump(mode="json") if m == own else params_cls().model_dump(mode="json")
        if search.space == "auto":
            specs = {p: ("auto", f"search.space.{p}") for p in search_space(params_cls)}
        else:
            specs = {p: (s, f"search.space.{p}") for p, s in entries.items() if p in params_cls.model_fields}
        block = blocks.get(m)
        if block == "auto":
            specs.update({p: ("auto", f"search.space.{m}") for p in search_space(params_cls)})
        elif block is not None:
            if not isinstance(block, dict):
                raise InputError(f"search.space.{m}", "expected auto or a mapping of the method's parameters to ranges")
            for p, s in block.items():
                s = _parse_spec(s, f"search.space.{m}.{p}")
                if p not in params_cls.model_fields:
                    fields = list(params_cls.model_fields)
                    raise InputError(f"search.space.{m}.{p}", f"method '{m}' has no parameter '{p}'{_suggest(p, fields)}; "
                                                              f"its parameters: {', '.join(fields) or 'none'}")
                specs[p] = (s, f"search.space.{m}.{p}")
        dims[m] = {p: _resolve_spec(params_cls, search_space(params_cls).get(p), f"method '{m}'", p, s, key, base[m])
                   for p, (s, key) in specs.items()}

    for p, s in entries.items():
        if not any(p in get_method(m).Params.model_fields for m in methods):
            names = sorted({f for m in methods for f in get_method(m).Params.model_fields} | set(known) | {"method"}
                           | {OPTIMIZER + f for f in OptimizerConfig.model_fields})
            raise InputError(f"search.space.{p}", f"no candidate method ({', '.join(methods)}) has a parameter '{p}'"
                                                  f"{_suggest(p, names)}; valid keys: {', '.join(names)}")
    space = SearchSpace(methods, method_spec is not None, dims, base, optimizer)
    if not space.method_searched and not dims[own] and not optimizer:
        raise InputError("search.space", f"nothing to search: method '{own}' declares no search ranges; "
                                         "name parameters with {low, high} or {choices}, or search `method`")
    if search.sampler == "grid":
        if space.method_searched:
            raise InputError("search.sampler", "the grid sampler cannot search `method` (each method has its own "
                                               "parameters); use tpe or random")
        for p, spec in {**dims[own], **{OPTIMIZER + k: v for k, v in optimizer.items()}}.items():
            if "choices" not in spec:
                raise InputError(f"search.space.{p}", "the grid sampler needs {choices: [...]} for every parameter")
    return space


def _parse_spec(value: Any, key: str) -> Any:
    """auto, a RangeSpec, a ChoicesSpec, or (a mapping of neither) a method's block, parsed later."""
    if value == "auto":
        return value
    if not isinstance(value, dict):
        raise InputError(key, f"expected {{low, high, log}}, {{choices: [...]}} or auto, got {value!r}")
    model = ChoicesSpec if "choices" in value else RangeSpec if {"low", "high", "log"} & set(value) else None
    if model is None:
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _input_error(exc, model, tuple(key.split("."))) from None


def _candidate_methods(spec: Any, pipeline) -> list[str]:
    if not isinstance(spec, ChoicesSpec):
        raise InputError("search.space.method", "expected {choices: [method, ...]}")
    known = registry()
    methods = list(dict.fromkeys(spec.choices))
    for m in methods:
        if m not in known:
            raise InputError("search.space.method", f"unknown method '{m}'{_suggest(str(m), known)}; "
                                                    f"expected some of {', '.join(sorted(known))}")
        try:
            known[m].check_pipeline(pipeline)
        except InputError as exc:
            raise InputError("search.space.method", f"method '{m}' cannot run this pipeline: {exc.message}") from None
    return methods


def _resolve_spec(model: type, declared: dict[str, Any] | None, owner: str, param: str, spec: Any, key: str,
                  base: dict[str, Any]) -> dict[str, Any]:
    """One parameter's range, each bound or choice validated by `model` (the method's Params, or OptimizerConfig)."""
    if param not in model.model_fields:
        fields = list(model.model_fields)
        raise InputError(key, f"{owner} has no parameter '{param}'{_suggest(param, fields)}; its parameters: {', '.join(fields)}")
    if spec == "auto":
        if declared is None:
            raise InputError(key, f"{owner} declares no search range for '{param}'; give {{low, high}} or {{choices}}")
        return declared
    if isinstance(spec, RangeSpec):
        resolved, values = {"low": spec.low, "high": spec.high, "log": spec.log}, [spec.low, spec.high]
    elif isinstance(spec, ChoicesSpec):
        resolved, values = {"choices": list(spec.choices)}, list(spec.choices)
    else:
        raise InputError(key, "expected {low, high, log}, {choices: [...]} or auto")
    for value in values:
        try:
            model.model_validate({**base, param: value})
        except ValidationError as exc:
            raise InputError(key, f"{value!r} is not a valid {param} for {owner}: {exc.errors()[0]['msg']}") from None
    return resolved
