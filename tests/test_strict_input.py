"""Input a parser or MLflow would take but that does not say what the user meant, or that MLflow cannot use later:
registry names MLflow refuses, keys given twice, booleans where numbers belong. Each is refused when the file is
loaded; the registry rules are compared with a real MLflow registry, so the two cannot drift apart."""

from __future__ import annotations

import copy
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.version import Version
from pydantic import ValidationError

from conftest import PIPELINES, run_process
from kdpipe.config import ALIAS_PATTERN, RegisterConfig
from kdpipe.errors import InputError
from kdpipe.pipeline import apply_overrides, json_schema, load_pipeline, read_yaml, validate_pipeline

DIGITS = PIPELINES / "digits.yaml"

MODEL_NAMES = ["digits-student", "Digits Student 2", "team/digits", "team:digits", "what?", "50%", "it's", 'say "hi"',
               "tab\there", "line\nbreak", "cr\rhere", ".", "..", "..hidden", ".hidden", "trailing.", "a@b", "é-model",
               "  ", "a#b", "back\\slash", "semi;colon", "bell\x07"]
ALIASES = ["champion", "candidate", "latest", "Latest", "LATEST", "v1", "V22", "v", "v1a", "version1", "_x", "a-b",
           "1x", "-x", "a b", "a.b", "é", "x" * 255, "x" * 256]


def refused_by_kdpipe(**register) -> bool:
    try:
        RegisterConfig(**{"model_name": "m", **register})
    except ValidationError:
        return True
    return False


def registry_clients(tmp_path: Path, monkeypatch) -> list:
    """Real MLflow registries: a sqlite store (kdpipe's default) and a file store."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    uris = [f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "file-store").as_uri()]
    return [MlflowClient(tracking_uri=uri, registry_uri=uri) for uri in uris]


def mlflow_cannot_use(client, name: str, source: Path) -> bool:
    """Whether the registry refuses the name, or cannot find its version again the ways kdpipe and its users do:
    a search by name (kdpipe.registry) and models:/NAME@ALIAS and models:/NAME/VERSION URIs."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    try:
        client.create_registered_model(name)
        version = str(client.create_model_version(name, source=str(source)).version)
        client.set_registered_model_alias(name, "champion", version)
        found = [v.name for v in client.search_model_versions(f"name='{name}'")]
        resolved = {tuple(map(str, get_model_name_and_version(client, f"models:/{name}{suffix}")))
                    for suffix in ("@champion", f"/{version}")}
    except MlflowException:
        return True
    return found != [name] or resolved != {(name, version)}


def test_model_names_kdpipe_refuses_are_exactly_those_mlflow_cannot_use(tmp_path, monkeypatch):
    clients = registry_clients(tmp_path, monkeypatch)
    broken = {n for n in MODEL_NAMES if any(mlflow_cannot_use(c, n, tmp_path) for c in clients)}
    refused = {n for n in MODEL_NAMES if refused_by_kdpipe(model_name=n)}
    if Version(version("mlflow")) >= Version("3.11"):
        assert refused == broken, f"kdpipe refuses but MLflow can use: {refused - broken}; the reverse: {broken - refused}"
    else:  # MLflow < 3.11 stores names with ':' or that are not a plain path; kdpipe refuses them with every MLflow,
        # so a registered name also works on a newer server
        assert broken <= refused and refused - broken == {"team:digits", "..hidden"}, (refused, broken)
    assert {"team/digits", "what?", "it's", "50%"} <= refused  # the list holds names both sides refuse


def test_aliases_mlflow_refuses_are_refused_with_its_reason(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    client = registry_clients(tmp_path, monkeypatch)[0]
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path))
    mlflow_refuses = set()
    for alias in ALIASES:
        try:
            client.set_registered_model_alias("m", alias, "1")
        except MlflowException:
            mlflow_refuses.add(alias)
    refused = {a for a in ALIASES if refused_by_kdpipe(alias=a)}
    # kdpipe's own character rule (a letter or _ first) is stricter than MLflow's; beyond it, MLflow's rules.
    assert refused == mlflow_refuses | {a for a in ALIASES if not re.fullmatch(ALIAS_PATTERN, a)}
    assert {"latest", "Latest", "v1", "V22", "x" * 256} <= mlflow_refuses


def run_kdpipe(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_process(*args, cwd=cwd)


def test_promote_and_mlflow_yaml_refuse_reserved_aliases_before_touching_the_registry(tmp_path):
    proc = run_kdpipe("promote", "digits-student", "--version", "1", "--alias", "LATEST", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        "--alias: 'latest' (in any case) is reserved by MLflow for a model's newest version, got 'LATEST'\n")
    config = tmp_path / "mlflow.yaml"
    config.write_text("registry: {candidate_alias: v7}\n")
    proc = run_kdpipe("promote", "digits-student", "--version", "1", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"registry.candidate_alias: {config}: v followed by digits is reserved by MLflow for version numbers "
        "(@v3 is version 3), got 'v7'\n")
    config.write_text("registry: {min_improvement: true}\n")
    proc = run_kdpipe("promote", "digits-student", "--version", "1", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"registry.min_improvement: {config}: expected a number, not a boolean, got True\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.yaml"]  # no store was opened


# --- keys given twice -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, where", [
    ("name: a\nname: b\n", "name", "line 2, column 1: given twice in one mapping (first at line 1, column 1)"),
    ("data:\n  augment:\n    - random_crop: {padding: 1, padding: 2}\n", "data.augment.0.random_crop.padding",
     "line 3, column 33: given twice in one mapping (first at line 3, column 21)"),
    ("a: &base {x: 1}\nb:\n  <<: *base\n  y: 2\n  y: 3\n", "b.y",
     "line 5, column 3: given twice in one mapping (first at line 4, column 3)"),
])
def test_a_key_given_twice_is_refused_at_its_place(tmp_path, text, key, where):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        read_yaml(path)
    assert (caught.value.key, caught.value.message) == (key, f"{where}; YAML would silently keep the last")


def test_what_stays_accepted(tmp_path):
    """A merge key overridden on purpose, `teacher_cache: off` (a YAML boolean) and a quoted number still load."""
    path = tmp_path / "pipeline.yaml"
    path.write_text("defaults: &defaults {epochs: 30, device: auto}\n" + DIGITS.read_text().replace(
        "  epochs: 30\n", '  <<: *defaults\n  epochs: "3"\n  teacher_cache: off\n'))
    raw = read_yaml(path)
    raw.pop("defaults")
    pipeline = validate_pipeline(raw)
    assert (pipeline.distill.epochs, pipeline.distill.teacher_cache) == (3, "off")
    assert load_pipeline(DIGITS, ["distill.teacher_cache=off"]).distill.teacher_cache == "off"


# --- booleans where numbers belong ----------------------------------------------------------------------------


def _resolve(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _variants(schema: dict, defs: dict) -> list[dict]:
    schema = _resolve(schema, defs)
    nested = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
    return [v for s in nested for v in _variants(s, defs)] if nested else [schema]


def _scalar_types(variants: list[dict]) -> set[str]:
    kinds = {"bool": "boolean", "int": "integer", "float": "number"}
    types = set()
    for v in variants:
        types |= set(v["type"]) if isinstance(v.get("type"), list) else {v.get("type")}
        types |= {kinds.get(type(x).__name__, "other") for x in v.get("enum", [])}
    return types


def numeric_places(schema: dict, defs: dict, loc: tuple = (), fixed: tuple = ()):
    """(where to write, the value to write there, the key the refusal must name, other keys to set) for every value
    the pipeline schema types as a number and never as a boolean: fields, list items, tuple members, method params."""
    variants = _variants(schema, defs)
    types = _scalar_types(variants)
    if types & {"integer", "number"} and "boolean" not in types:
        yield loc, True, loc, fixed
    for v in variants:
        method = v.get("properties", {}).get("method", {}).get("const")  # a distill section: for its method only
        here = fixed + ((loc + ("method",), method),) if method else fixed
        for key, sub in v.get("properties", {}).items():
            yield from numeric_places(sub, defs, loc + (key,), here)
        if "items" in v and _scalar_types(_variants(v["items"], defs)) & {"integer", "number"}:
            yield loc, [True], loc + (0,), fixed
        elif "items" in v:
            yield from numeric_places(v["items"], defs, loc + (0,), fixed)
        for i, _ in enumerate(v.get("prefixItems", [])):
            yield loc, [True if j == i else x for j, x in enumerate(schema.get("default"))], loc + (i,), fixed


def put(raw: dict, loc: tuple, value) -> None:
    node = raw
    for part, after in zip(loc, loc[1:]):
        if isinstance(node, list):
            node.extend({} for _ in range(part + 1 - len(node)))
        elif part not in node or node[part] is None:
            node[part] = [] if isinstance(after, int) else {}
        node = node[part]
    node[loc[-1]] = value


def outcome(raw: dict) -> InputError | None:
    try:
        validate_pipeline(raw)
    except InputError as exc:
        return exc
    return None


def test_every_number_in_the_schema_refuses_a_boolean():
    """Every numeric key of every section and of every method's params: where 1 is taken, `true` (which pydantic
    would read as 1) is refused naming the key; where 1 is refused too, so is `true`. (Search ranges and choices:
    tests/test_faults.py.)"""
    schema = json_schema()
    base = yaml.safe_load(DIGITS.read_text())
    base["distill"].pop("params")  # each method's own params are set below
    base["data"].update(normalize={"mean": [0.5], "std": [0.5]}, augment=[])
    base["search"] = {}
    places = list(numeric_places(schema, schema["$defs"]))
    assert any(loc[:2] == ("distill", "params") for _, _, loc, _ in places)
    taken_as_one = 0
    for where, value, loc, fixed in places:
        raws = [copy.deepcopy(base), copy.deepcopy(base)]
        for raw, written in zip(raws, (value, [1 if v is True else v for v in value] if isinstance(value, list) else 1)):
            for fixed_loc, fixed_value in fixed:
                put(raw, fixed_loc, fixed_value)
            put(raw, where, written)
        boolean, one = map(outcome, raws)
        assert boolean is not None, loc
        if one is None:
            taken_as_one += 1
            assert boolean.key == ".".join(map(str, loc)), (loc, boolean.message)
            assert re.fullmatch(r"expected (an integer|a number), not a boolean, got True", boolean.message), loc
        else:  # refused as 1 is (a bound), or as a boolean first
            assert boolean.key in (one.key, ".".join(map(str, loc))), (loc, boolean.message, one.message)
    assert taken_as_one > 100


def test_a_boolean_via_set_is_refused_naming_the_key():
    raw = apply_overrides(yaml.safe_load(DIGITS.read_text()), ["distill.optimizer.lr=true"])
    with pytest.raises(InputError) as caught:
        validate_pipeline(raw)
    assert caught.value.format("f.yaml") == "f.yaml: distill.optimizer.lr: expected a number, not a boolean, got True"
