"""The documentation site: the reference pages generated from the code name every key of the schema and every
method, and the whole site builds with `mkdocs build --strict` (a broken link, a missing anchor or a page left out
of the nav fails)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli

HOOK = ROOT / "docs" / "hooks" / "reference.py"


def reference():
    """docs/hooks/reference.py, imported as the test's module (MkDocs imports it as its hook)."""
    spec = importlib.util.spec_from_file_location("kdpipe_docs_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    module = reference()
    return {path: getattr(module, writer)() for path, writer in module.PAGES.items()}


def keys_of(schema: dict) -> dict[str, set[str]]:
    """Every property name of the schema, per object it belongs to (the top level and each of `$defs`)."""
    found = {"(top level)": set(schema["properties"])}
    for name, node in schema["$defs"].items():
        if node.get("properties"):
            found[name] = set(node["properties"])
    return found


def listed_keys(markdown: str) -> set[str]:
    """The dotted keys in the first column of the pipeline reference's tables."""
    return {line.split("`")[1] for line in markdown.splitlines() if line.startswith("| `")}


def test_every_key_of_the_schema_is_in_the_pipeline_reference(pages):
    result = cli("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    listed = listed_keys(pages["reference/pipeline.md"])
    last_parts = {key.rsplit(".", 1)[-1] for key in listed}
    missing = {f"{owner}.{key}" for owner, names in keys_of(schema).items() for key in names if key not in last_parts}
    assert not missing, f"schema keys the generated reference does not list: {sorted(missing)}"
    for top in schema["properties"]:
        assert top in listed, top


def test_every_method_and_its_parameters_are_in_the_references(pages):
    from kdpipe.methods import registry

    methods, pipeline = pages["reference/methods.md"], pages["reference/pipeline.md"]
    for name, cls in registry().items():
        assert f"## `{name}`" in methods, name
        assert f"### `distill.method: {name}`" in pipeline, name
        assert cls.summary and cls.summary.split(":")[0] in methods, name
        for param in cls.Params.model_fields:
            assert f"`distill.params.{param}`" in methods, (name, param)
    assert "| `distill.params.temperature` | `4.0` | [1.0, 20.0] log |" in methods  # kd's declared search range


def test_every_command_and_option_is_in_the_cli_reference(pages):
    import typer.main

    from kdpipe.cli import app

    text = pages["reference/cli.md"]
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## `kdpipe {name}`" in text, name
        for param in command.params:
            assert any(f"`{opt}`" in text for opt in [*param.opts, param.name.upper()]), (name, param.name)


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs is not installed: bash scripts/install.sh docs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    generated = tmp_path / "site" / "reference" / "pipeline" / "index.html"
    assert "distill.params.temperature" in generated.read_text()
    assert not (ROOT / "docs" / "reference" / "pipeline.md").exists()  # generated at build time, never committed
