"""The search space: which methods and parameters a campaign searches, from the pipeline file's `search.space`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kdpipe.config import ChoicesSpec, ExportConfig, OptimizerConfig, RangeSpec
from kdpipe.config_errors import input_error, suggest
from kdpipe.errors import InputError
from kdpipe.config_base import active_conditions, search_space
from kdpipe.methods import get_method, registry

OPTIMIZER = "optimizer."  # space keys naming distill.optimizer settings (lr, momentum, weight_decay, ...)
EXPORT = "export."  # space keys naming the export settings a trial builds and scores (EXPORT_KEYS)
EXPORT_KEYS = tuple(search_space(ExportConfig))  # the export settings that declare a search range
# What a trial's static INT8 is built from: export.int8_budget's sensitivity search is not run per trial.
BUDGETED = ("quantize", "calibration_method", "calibration_percentile")


@dataclass
class Choice:
    """What one trial trains with."""

    method: str
    params: dict[str, Any]  # the method's full parameters
    optimizer: dict[str, Any]  # the distill.optimizer keys the search sets
    export: dict[str, Any]  # the export keys the search sets (EXPORT_KEYS)


@dataclass
class SearchSpace:
    methods: list[str]  # candidate methods; the pipeline's own method alone when the method is not searched
    method_searched: bool
    dims: dict[str, dict[str, dict[str, Any]]]  # method -> parameter -> {low, high, log} | {choices}
    base: dict[str, dict[str, Any]]  # method -> its parameters outside the search
    optimizer: dict[str, dict[str, Any]]  # distill.optimizer key -> range, shared by every method
    export: dict[str, dict[str, Any]]  # export key -> range, shared by every method
    export_base: dict[str, Any]  # the pipeline's export settings

    def key(self, method: str, param: str) -> str:
        """Optuna's parameter name: prefixed by the method when the method is searched, so each keeps its own space."""
        return f"{method}.{param}" if self.method_searched else param

    def suggest(self, trial) -> Choice:
        method = trial.suggest_categorical("method", self.methods) if self.method_searched else self.methods[0]
        params = get_method(method).Params
        values = _inactive_at_default(params, {**self.base[method], **_draw_all(
            trial, params, self.dims[method], self.base[method], lambda name: self.key(method, name))})
        optimizer = {name: _draw(trial, OPTIMIZER + name, spec, False) for name, spec in self.optimizer.items()}
        export = _draw_all(trial, ExportConfig, self.export, self.export_base, lambda name: EXPORT + name)
        return Choice(method, values, optimizer, export)

    def decode(self, flat: dict[str, Any]) -> Choice:
        """What a trial trained with, from its Optuna parameters."""
        method = flat.get("method", self.methods[0])
        values = dict(self.base[method])
        values.update({name: flat[self.key(method, name)] for name in self.dims[method] if self.key(method, name) in flat})
        values = _inactive_at_default(get_method(method).Params, values)
        return Choice(method, values, {name: flat[OPTIMIZER + name] for name in self.optimizer if OPTIMIZER + name in flat},
                      {name: flat[EXPORT + name] for name in self.export if EXPORT + name in flat})

    def grid(self) -> dict[str, list]:
        grid = {self.key(m, p): spec["choices"] for m, dims in self.dims.items() for p, spec in dims.items()}
        grid |= {EXPORT + name: spec["choices"] for name, spec in self.export.items()}
        return grid | {OPTIMIZER + name: spec["choices"] for name, spec in self.optimizer.items()}

    def quantizations(self) -> set[str]:
        """The export.quantize values a trial may build."""
        return set(self.export.get("quantize", {}).get("choices", [self.export_base["quantize"]]))


def with_export(pipeline, export: dict[str, Any]):
    """A copy of `pipeline` with the export keys a trial drew (or the best trial's). A drawn quantize decides which
    model ships: none the FP32 student, any other its INT8 model (deliver int8, or best where the file says best)."""
    settings = {**pipeline.export.model_dump(mode="json"), **export}
    if "quantize" in export:
        settings["deliver"] = ("fp32" if export["quantize"] == "none"
                               else "best" if pipeline.export.deliver == "best" else "int8")
    return pipeline.model_copy(update={"export": ExportConfig.model_validate(settings)})


def _draw_all(trial, model: type, dims: dict[str, dict[str, Any]], base: dict[str, Any], key) -> dict[str, Any]:
    """The parameters of `dims` (fields of `model`) drawn for `trial`, `key(name)` naming each for Optuna.
    Unconditional parameters first: a conditional one is drawn only where its condition holds (`base` otherwise),
    in the order `model` declares them, so a condition on a conditional one (calibration_percentile on
    calibration_method on quantize) sees its drawn value."""
    conditions = active_conditions(model)
    order = {name: i for i, name in enumerate(model.model_fields)}
    values, drawn = dict(base), {}
    for name in sorted(dims, key=lambda n: (n in conditions, order[n] if n in conditions else 0)):
        if all(values[other] in allowed for other, allowed in conditions.get(name, {}).items()):
            values[name] = drawn[name] = _draw(trial, key(name), dims[name], model.model_fields[name].annotation is int)
    return drawn


def _inactive_at_default(model: type, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters, each conditional one whose condition does not hold put back at its default: it acts on
    nothing, and the file's value for the setting not drawn (kd's alpha once weights: separate is drawn) would read
    as a contradiction when the run's record is checked again (`--resume`)."""
    conditions, defaults = active_conditions(model), model().model_dump(mode="json")
    return {name: value if all(values.get(other) in allowed for other, allowed in conditions.get(name, {}).items())
            else defaults[name] for name, value in values.items()}


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
    export_base = pipeline.export.model_dump(mode="json")
    export = _export_dims(entries, export_base)
    for name in blocks:
        if name not in methods:
            raise InputError(f"search.space.{name}", f"method '{name}' is not searched (candidates: {', '.join(methods)})")

    dims: dict[str, dict[str, dict[str, Any]]] = {}
    base: dict[str, dict[str, Any]] = {}
    for m in methods:
        params_cls = get_method(m).Params
        base[m] = pipeline.distill.params.model_dump(mode="json") if m == own else params_cls().model_dump(mode="json")
        specs = _method_specs(m, params_cls, search.space == "auto", entries, blocks.get(m))
        dims[m] = {p: _resolve_spec(params_cls, search_space(params_cls).get(p), f"method '{m}'", p, s, key, base[m])
                   for p, (s, key) in specs.items()}
    _refuse_unknown(entries, methods, known)
    space = SearchSpace(methods, method_spec is not None, dims, base, optimizer, export, export_base)
    _check_space(space, search.sampler, own)
    return space


def _method_specs(m: str, params_cls, auto: bool, entries: dict[str, Any], block: Any) -> dict[str, tuple[Any, str]]:
    """Method `m`'s parameters to search, each with its spec and the key an error names: the space's shared
    entries that `m` has, then its own block (auto, or a mapping of its parameters)."""
    if auto:
        specs = {p: ("auto", f"search.space.{p}") for p in search_space(params_cls)}
    else:
        specs = {p: (s, f"search.space.{p}") for p, s in entries.items() if p in params_cls.model_fields}
    if block == "auto":
        specs.update({p: ("auto", f"search.space.{m}") for p in search_space(params_cls)})
    elif block is not None:
        if not isinstance(block, dict):
            raise InputError(f"search.space.{m}", "expected auto or a mapping of the method's parameters to ranges")
        for p, s in block.items():
            s = _parse_spec(s, f"search.space.{m}.{p}")
            if p not in params_cls.model_fields:
                fields = list(params_cls.model_fields)
                raise InputError(f"search.space.{m}.{p}", f"method '{m}' has no parameter '{p}'{suggest(p, fields)}; "
                                                          f"its parameters: {', '.join(fields) or 'none'}")
            specs[p] = (s, f"search.space.{m}.{p}")
    return specs


def _refuse_unknown(entries: dict[str, Any], methods: list[str], known) -> None:
    """A shared entry no candidate method has is a typo or a misplaced key: refused, naming the valid keys."""
    for p in entries:
        if not any(p in get_method(m).Params.model_fields for m in methods):
            names = sorted({f for m in methods for f in get_method(m).Params.model_fields} | set(known) | {"method"}
                           | {OPTIMIZER + f for f in OptimizerConfig.model_fields})
            raise InputError(f"search.space.{p}", f"no candidate method ({', '.join(methods)}) has a parameter '{p}'"
                                                  f"{suggest(p, names)}; valid keys: {', '.join(names)}")


def _check_space(space: SearchSpace, sampler: str, own: str) -> None:
    """Spaces that cannot run: an export setting that never acts (qat_epochs without qat), nothing to search, a
    grid over ranges or methods."""
    dims, optimizer, export = space.dims, space.optimizer, space.export
    for name, condition in active_conditions(ExportConfig).items():
        for other, allowed in condition.items() if name in export else ():
            possible = export[other].get("choices", []) if other in export else [space.export_base[other]]
            if not set(possible) & set(allowed):
                values = " or ".join(allowed)
                raise InputError(f"search.space.{EXPORT}{name}", f"acts only with {EXPORT}{other} {values}: set it, "
                                                                 f"or search {EXPORT}{other} with {values} among its "
                                                                 f"choices")
    if not space.method_searched and not dims[own] and not optimizer and not export:
        raise InputError("search.space", f"nothing to search: method '{own}' declares no search ranges; "
                                         "name parameters with {low, high} or {choices}, or search `method`")
    if sampler == "grid":
        if space.method_searched:
            raise InputError("search.sampler", "the grid sampler cannot search `method` (each method has its own "
                                               "parameters); use tpe or random")
        for p, spec in {**dims[own], **{OPTIMIZER + k: v for k, v in optimizer.items()},
                        **{EXPORT + k: v for k, v in export.items()}}.items():
            if "choices" not in spec:
                raise InputError(f"search.space.{p}", "the grid sampler needs {choices: [...]} for every parameter")


def _export_dims(entries: dict[str, Any], export_base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The export keys of the space (popped from `entries`), each choice validated as export settings. A searched
    quantize decides what ships (with_export), so each choice is checked as with deliver fp32."""
    dims = {}
    for name in [n for n in entries if n.startswith(EXPORT)]:
        key, param = f"search.space.{name}", name[len(EXPORT):]
        if param not in EXPORT_KEYS:
            raise InputError(key, f"the search sets {', '.join(EXPORT + k for k in EXPORT_KEYS)} of the export "
                                  f"settings, not '{param}'{suggest(param, EXPORT_KEYS)}")
        if param in BUDGETED and export_base.get("int8_budget") is not None:
            # A trial scores plain INT8 (sensitivity per trial would cost a build per node): not what would ship.
            raise InputError(key, f"export.int8_budget keeps nodes in float in the run's static INT8, which trials "
                                  f"do not build: search export.{param} without it, or set {param} and int8_budget "
                                  f"in export")
        dims[param] = _resolve_spec(ExportConfig, search_space(ExportConfig).get(param), "export", param,
                                    entries.pop(name), key, {**export_base, "deliver": "fp32"})
    return dims


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
        raise input_error(exc, model, tuple(key.split("."))) from None


def _candidate_methods(spec: Any, pipeline) -> list[str]:
    if not isinstance(spec, ChoicesSpec):
        raise InputError("search.space.method", "expected {choices: [method, ...]}")
    known = registry()
    methods = list(dict.fromkeys(spec.choices))
    for m in methods:
        if m not in known:
            raise InputError("search.space.method", f"unknown method '{m}'{suggest(str(m), known)}; "
                                                    f"expected some of {', '.join(sorted(known))}")
        # Another method is judged with its own default params: the pipeline's params are the pipeline method's.
        candidate = pipeline if m == pipeline.distill.method else pipeline.with_method(m, {})
        try:
            known[m].check_pipeline(candidate)
        except InputError as exc:
            raise InputError("search.space.method", f"method '{m}' cannot run this pipeline: {exc.message}") from None
    return methods


def _resolve_spec(model: type, declared: dict[str, Any] | None, owner: str, param: str, spec: Any, key: str,
                  base: dict[str, Any]) -> dict[str, Any]:
    """One parameter's range, each bound or choice validated by `model` (the method's Params, or OptimizerConfig)."""
    if param not in model.model_fields:
        fields = list(model.model_fields)
        raise InputError(key, f"{owner} has no parameter '{param}'{suggest(param, fields)}; its parameters: {', '.join(fields)}")
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
