"""The pipeline file: its top level, whose `distill` section is a union discriminated by `method` and `data`
section a union discriminated by `source`, loading, and `--set` overrides.

Each registered method contributes one distill section, `{method: NAME, params: <its Params>, ...the shared
keys}`, and each registered source one data section, so `kdpipe schema` documents every method's parameters
and every source's keys (plugins' included), and one validation pass checks a whole file. The registries of
installed things the sections check names against (zoo, model libraries, onnxruntime providers) are passed
here, in the validation context.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, create_model, model_validator

from kdpipe.config import (DistillBase, ExportConfig, RegisterConfig, SearchConfig, Seed, Strict, StudentConfig,
                           TeacherConfig, ValidateConfig, check_milestones)
from kdpipe.config_errors import input_error, shown
from kdpipe.config_paths import resolve_paths
from kdpipe.data.sources import DEFAULT_SOURCE, data_config, data_union
from kdpipe.errors import InputError
from kdpipe.methods import get_method, registry
from kdpipe.models import ZOO
from kdpipe.models.external import PREFIXES
from kdpipe.plugins import GROUPS, loaded
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
DataSection = data_union()


def distill_section(values: dict[str, Any]):
    """A distill section from plain data (e.g. the search's best method and params over the file's other keys)."""
    return _DISTILL.validate_python(values)


class Pipeline(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: Seed = Field(0, description="the run's seed; with seeds and seed_scope student, the seed of what the seeds "
                                      "share: the data split and the teacher")
    seeds: list[Seed] | None = Field(None, description="distill once per seed, each a nested run of one parent run "
                                                       "whose report gives every number's mean ± sample standard "
                                                       "deviation (n − 1); `kdpipe run --seeds 0,1,2` overrides it")
    seed_scope: Literal["student", "run"] = Field(
        "student", description="with seeds: student, each seed trains its own student (initialization, batch order, "
                               "augmentation, the method's draws) on the data split and teacher of `seed` (the "
                               "teacher trained once, cached); run, each seed is a whole run's seed (its own data "
                               "split and teacher)")
    student_seed: Seed | None = Field(None, description="the student's seed (initialization, batch order, "
                                                        "augmentation, the method's draws); default: seed. Each run "
                                                        "of a multi-seed run sets it to its seed")
    data: DataSection = Field(default_factory=data_config)
    teacher: TeacherConfig | None = None
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=lambda: distill_section({"method": DEFAULT_METHOD}))
    export: ExportConfig = Field(default_factory=ExportConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    registry: RegisterConfig | None = Field(None, alias="register")
    search: SearchConfig | None = Field(None, description="an Optuna campaign over the method's parameters before distill")

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, raw: Any) -> Any:
        for key, tag, default in (("distill", "method", DEFAULT_METHOD), ("data", "source", DEFAULT_SOURCE)):
            section = raw.get(key) if isinstance(raw, dict) else None
            if isinstance(section, dict) and tag not in section:
                raw = {**raw, key: {tag: default, **section}}
        return raw

    @property
    def training_seed(self) -> int:
        """The seed of the student's training: student_seed, else seed."""
        return self.seed if self.student_seed is None else self.student_seed

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

    def record(self) -> str:
        """RUN_DIR/pipeline.yaml: the resolved pipeline as a pipeline file that loads back to this pipeline."""
        return yaml.safe_dump(self.resolved(), sort_keys=False)


MAX_FILE_BYTES = 1 << 20  # a pipeline file is a page of settings; anything larger is not one
MAX_DEPTH = 64  # nesting levels, counting what aliases pull in
MAX_NODES = 100_000  # values after expanding aliases (a "billion laughs" file expands to 10^9)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than MAX_DEPTH or holding more than MAX_NODES
    values once aliases are expanded. Sizes are counted as nodes are composed, before anything is built,
    so a file cannot make kdpipe recurse or allocate beyond those bounds. A key given twice in one mapping is
    refused too: PyYAML would keep the last silently, and the file would not say what its writer meant."""

    def __init__(self, stream):
        super().__init__(stream)
        self._nesting = 0
        self._path: tuple[str | int, ...] = ()  # keys and list positions down to the node being composed
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded
        self._values = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        self._nesting += 1
        if self._nesting > MAX_DEPTH:
            raise _too_large(mark, f"nesting deeper than {MAX_DEPTH} levels")
        # index: the key node of a mapping's value, the position of a list item, None for keys and the document
        step = index.value if isinstance(index, yaml.ScalarNode) else index if isinstance(index, int) else None
        outer = self._path
        self._path = outer if step is None else (*outer, step)
        try:
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.MappingNode) and not alias:
                self._refuse_duplicate_keys(node)
        finally:
            self._nesting -= 1
            self._path = outer
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

    def _refuse_duplicate_keys(self, mapping: yaml.MappingNode) -> None:
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in mapping.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:  # `<<: *base` then a key: an override
                continue
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                raise InputError(".".join(map(str, [*self._path, key.value])),
                                 f"{_where(key.start_mark)}: given twice in one mapping (first at "
                                 f"{_where(seen.start_mark)}); YAML would silently keep the last")


MERGE_TAG = "tag:yaml.org,2002:merge"


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _too_large(mark, problem: str) -> InputError:
    return InputError("", f"{_where(mark)}: {problem}; a pipeline file cannot hold that")


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
            raise InputError("--set", f"expected key.path=value, got {shown(item)}")
        try:
            value = _parse_yaml(text)
        except yaml.YAMLError:
            value = text
        except InputError as exc:  # a key given twice in the value, or a value too large: named under the --set key
            raise InputError(".".join(filter(None, [key, exc.key])), f"--set {key}: {exc.message}") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(key, f"--set cannot descend into '{part}', which holds {shown(child)}")
            node = child
        node[parts[-1]] = value
    return raw


def resolve_file_paths(raw: dict[str, Any], folder: Path, origin: str, overrides: list[str] | None = None
                       ) -> dict[str, Any]:
    """`raw` with every path its schema marks (kdpipe.config_paths) made absolute: against `folder` (`origin` says
    what it is), those under a key given by `overrides` (--set) against the working directory."""
    given = [tuple(item.partition("=")[0].split(".")) for item in overrides or []]

    def base(loc: tuple) -> tuple[Path, str]:
        if any(loc[:len(key)] == key for key in given):
            return Path.cwd(), "the working directory (--set)"
        return folder, origin

    return resolve_paths(Pipeline, raw, (), base)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """The pipeline file with `--set` overrides: relative paths in the file resolve against the file's folder,
    those given with --set against the working directory."""
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    return validate_pipeline(resolve_file_paths(raw, Path(path).resolve().parent, "the pipeline file's folder",
                                                overrides))


def validation_context() -> dict[str, Any]:
    """The registries the sections check names against (kdpipe.config_base.known)."""
    from kdpipe.onnx_runtime import known_providers

    return {"architectures": ZOO, "model_libraries": PREFIXES, "providers": known_providers()}


def validate_pipeline(raw: dict[str, Any]) -> Pipeline:
    try:
        pipeline = Pipeline.model_validate(raw, context=validation_context())
    except ValidationError as exc:
        raise input_error(exc, Pipeline, ()) from None
    _check_numbers(pipeline.model_dump(by_alias=True), ())
    _check_providers(pipeline.validation)
    _check_runtimes(pipeline.validation)
    check_milestones(pipeline.distill.optimizer, pipeline.distill.epochs, "distill.optimizer.milestones")
    if pipeline.teacher is not None:
        check_milestones(pipeline.teacher.train.optimizer, pipeline.teacher.train.epochs,
                         "teacher.train.optimizer.milestones")
    get_method(pipeline.distill.method).check_pipeline(pipeline)
    _check_seeds(pipeline)
    if pipeline.search is not None:
        resolve_space(pipeline)  # raises InputError naming the search.space key
    return pipeline


def _check_seeds(pipeline: Pipeline) -> None:
    """How seeds, seed, seed_scope, student_seed and distill.baseline go together (InputError, exit 2)."""
    seeds = pipeline.seeds
    if seeds is not None:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise InputError("seeds", f"expected distinct seeds, got {shown(repeated[0])} more than once")
        if len(seeds) < 2:
            raise InputError("seeds", f"expected at least 2 seeds (the spread is a sample standard deviation, n − 1), "
                                      f"got {shown(seeds)}; for one run, set seed: instead")
        if pipeline.student_seed is not None:
            raise InputError("student_seed", "contradicts seeds: each of the seeds is its run's student seed; remove "
                                             "student_seed (seed: stays the seed of the shared data split and teacher)")
        if pipeline.search is not None:
            raise InputError("seeds", "a multi-seed run has no search: section; run the search first, then the seeds "
                                      "with the method and parameters it chose")
    elif pipeline.seed_scope != "student":
        raise InputError("seed_scope", "acts only with seeds (kdpipe run --seeds or the seeds: key); remove it")
    if pipeline.distill.baseline and seeds is None:
        raise InputError("distill.baseline", "acts only with seeds (kdpipe run --seeds or the seeds: key): the gain "
                                             "over the baseline is a mean over seeds")
    if pipeline.distill.baseline and pipeline.distill.method == "none":
        raise InputError("distill.baseline", "the method is none already, so the baseline would be the same runs; "
                                             "set it to false")


INT64 = 1 << 63


def _check_numbers(value: Any, loc: tuple) -> None:
    """Reject NaN and infinities (no setting means anything with them) and integers beyond 64 bits (torch, numpy
    and onnxruntime overflow on them at run time) wherever the schema let them through, keys and lists included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(".".join(map(str, loc)), f"expected a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise InputError(".".join(map(str, loc)), f"expected an integer that fits in 64 bits, got {shown(value)}")
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


def _check_runtimes(cfg: ValidateConfig) -> None:
    """A listed runtime that does not import: validate could only fail, after the training, so it is bad input."""
    from kdpipe.openvino_runtime import import_openvino

    if "openvino" in cfg.runtimes:
        try:
            import_openvino()
        except RuntimeError as exc:
            raise InputError("validate.runtimes", str(exc)) from None


def provider_warnings(pipeline: Pipeline) -> list[str]:
    """One warning line per listed provider this onnxruntime lacks (validate will run without it)."""
    from kdpipe.onnx_runtime import missing_providers

    return [f"warning: validate.providers: {p} is not available in this onnxruntime; validate will fall back "
            "(providers: auto picks what is available without a warning)" for p in missing_providers(pipeline.validation.providers)]


def json_schema() -> dict[str, Any]:
    """The pipeline file's JSON Schema; `x-kdpipe-plugins` names, per entry-point group, the plugins in it and the
    packages they come from."""
    return {**Pipeline.model_json_schema(by_alias=True), "x-kdpipe-plugins": {g: loaded(g) for g in GROUPS}}
