"""The reference pages, generated from the code when the site is built (a MkDocs hook: `hooks:` in mkdocs.yml), so
they cannot drift from it: every pipeline key from the schema `kdpipe schema` prints (type, default, search range,
when it acts, description), every CLI command from the click tree typer builds, every method from the registry
(`kdpipe methods`). No copy is committed: `on_files` adds the pages to the build as generated files.

tests/test_docs.py imports this file: every key of the schema and every method must appear in what it writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Page path in the site -> the function writing its Markdown.
PAGES = {
    "reference/pipeline.md": "pipeline_reference",
    "reference/cli.md": "cli_reference",
    "reference/methods.md": "methods_reference",
}
ROOT = Path(__file__).resolve().parents[2]


def _cell(text: Any) -> str:
    """`text` fit for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`" if not isinstance(value, str) else f"`{value}`"


# ---------------------------------------------------------------------------------------------- pipeline file keys

class _Schema:
    def __init__(self, schema: dict):
        self.schema = schema
        self.defs = schema.get("$defs", {})

    def resolve(self, node: dict) -> dict:
        while "$ref" in node:
            node = {**self.defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def type_of(self, node: dict) -> str:
        node = self.resolve(node)
        if "const" in node:
            return _code(node["const"])
        if "enum" in node:
            return " \\| ".join(_code(v) for v in node["enum"])
        for union in ("anyOf", "oneOf"):
            if union in node:
                return " \\| ".join(self.type_of(member) for member in node[union])
        kind = node.get("type")
        if kind == "array":
            items = node.get("items")
            return f"list of {self.type_of(items)}" if items else "list"
        if kind == "object":
            return node.get("title", "mapping") if node.get("properties") else "mapping"
        if kind == "null":
            return "null"
        bounds = [f"{op} {node[key]}" for key, op in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                        ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in node]
        names = {"integer": "int", "number": "float", "string": "string", "boolean": "bool"}
        shown = names.get(kind, kind or "any")
        return f"{shown} ({', '.join(bounds)})" if bounds else shown

    def sections(self, node: dict) -> list[dict]:
        """The object schemas (with properties) a key's value may be: itself, its union's members, a list's items."""
        node = self.resolve(node)
        found = []
        if node.get("properties"):
            found.append(node)
        for union in ("anyOf", "oneOf"):
            for member in node.get(union, []):
                found += self.sections(member)
        if node.get("type") == "array" and node.get("items"):
            found += self.sections(node["items"])
        return found


def _search(node: dict) -> str:
    rng = node.get("search")
    if not rng:
        return ""
    if "choices" in rng:
        return "choices " + ", ".join(_code(c) for c in rng["choices"])
    return f"[{rng['low']}, {rng['high']}]" + (" log" if rng.get("log") else "")


def _about(node: dict) -> str:
    about = node.get("description", "")
    for other, allowed in node.get("when", {}).items():
        about += f" (acts when `{other}` is {', '.join(_code(a) for a in allowed)})"
    return about


def key_rows(schema: _Schema, node: dict, prefix: str, depth: int = 0) -> list[tuple[str, dict]]:
    """(dotted key, its schema) for every property of the object `node`, depth first; a list's items are under
    `KEY[]`."""
    rows = []
    required = set(node.get("required", []))
    for name, prop in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        rows.append((path, {**prop, "x-required": True} if name in required else prop))
        resolved = schema.resolve(prop)
        if "discriminator" in resolved or depth > 12:
            continue  # discriminated unions get a section per member (pipeline_reference)
        item = "[]" if resolved.get("type") == "array" else ""
        for section in schema.sections(prop):
            rows += key_rows(schema, section, f"{path}{item}.", depth + 1)
    return _unique(rows)


def _unique(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    seen, kept = set(), []
    for path, prop in rows:
        if path not in seen:
            seen.add(path)
            kept.append((path, prop))
    return kept


def _table(schema: _Schema, rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["| key | type | default | search range | description |", "|---|---|---|---|---|"]
    for path, prop in rows:
        resolved = schema.resolve(prop)
        default = _code(prop["default"]) if "default" in prop else ("required" if prop.get("x-required") else "")
        lines.append(f"| `{path}` | {schema.type_of(prop)} | {_cell(default)} | {_cell(_search(resolved))} "
                     f"| {_cell(_about({**resolved, **prop}))} |")
    return lines + [""]


def _union(schema: _Schema, key: str, node: dict) -> tuple[str, dict[str, dict]]:
    """A discriminated union's discriminator and its members' schemas by discriminator value."""
    node = schema.resolve(node)
    mapping = node["discriminator"]["mapping"]
    return node["discriminator"]["propertyName"], {
        value: schema.resolve({"$ref": ref}) for value, ref in sorted(mapping.items())}


def pipeline_reference(schema: dict | None = None) -> str:
    """Markdown: every key of a pipeline file, from the JSON Schema (kdpipe.pipeline.json_schema)."""
    if schema is None:
        from kdpipe.pipeline import json_schema

        schema = json_schema()
    s = _Schema(schema)
    out = ["# Pipeline file keys", "",
           "Generated when the site is built from the schema that `kdpipe schema` prints (`kdpipe.pipeline."
           "json_schema()`), so it lists exactly what `kdpipe check` accepts. A key written `a.b` is `b` inside "
           "`a:`; `a[].b` is `b` in an item of the list `a`. The search range is the range a `search:` section "
           "draws from with `auto` (see [Methods](methods.md) for each method's parameters).", ""]
    top = schema["properties"]
    plain = [(k, v) for k, v in top.items() if not s.sections(v) and "discriminator" not in s.resolve(v)]
    out += ["## Top-level keys", ""] + _table(s, plain)
    for key, node in top.items():
        resolved = s.resolve(node)
        if (key, node) in plain:
            continue
        out += [f"## `{key}`", ""]
        if "description" in node:
            out += [node["description"], ""]
        if "discriminator" not in resolved:
            out += _table(s, key_rows(s, {"properties": {key: node}}, ""))
            continue
        tag, members = _union(s, key, node)
        # Keys every member has alike are listed once; the rest per member.
        member_rows = {value: key_rows(s, m, f"{key}.") for value, m in members.items()}
        shared = {path: prop for path, prop in next(iter(member_rows.values()))
                  if path != f"{key}.{tag}" and all((path, prop) in rows for rows in member_rows.values())}
        out += [f"`{key}` is one of {len(members)} kinds, told apart by `{key}.{tag}`: "
                + ", ".join(f"`{v}`" for v in members) + ".", "",
                f"### Keys of every `{key}.{tag}`", ""]
        itself = {"type": "object", "description": f"one of the kinds below, chosen by `{key}.{tag}`",
                  "x-required": key in schema.get("required", [])}
        out += _table(s, [(key, itself), (f"{key}.{tag}", {"type": "string", "enum": list(members), "x-required": True})] + list(shared.items()))
        for value, rows in member_rows.items():
            own = [(p, prop) for p, prop in rows if p not in shared and p != f"{key}.{tag}"]
            out += [f"### `{key}.{tag}: {value}`", ""]
            description = s.resolve(members[value]["properties"][tag]).get("description")
            if description:
                out += [_cell(description), ""]
            out += _table(s, own) if own else ["No keys of its own.", ""]
    plugins = schema.get("x-kdpipe-plugins", {})
    if any(plugins.values()):
        out += ["## Plugins in this build", "", *[f"- {group}: {', '.join(names)}"
                                                  for group, names in plugins.items() if names], ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------- the CLI

def _annotation(param) -> str:
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if annotation is None:
        return ""
    name = getattr(annotation, "__name__", None) or str(annotation)
    return {"Path": "path", "str": "text", "int": "integer", "bool": "flag"}.get(name, str(annotation).replace("typing.", ""))


def cli_reference() -> str:
    """Markdown: every command of `kdpipe`, its help and its arguments and options, from the click tree typer builds."""
    import typer.main

    from kdpipe.cli import app

    group = typer.main.get_command(app)
    out = ["# Command line", "", "Generated when the site is built from the command tree of `kdpipe` (typer), so "
           "every command and option is here with the help `kdpipe COMMAND --help` prints.", "",
           group.help or "", ""]
    out += _params_table(group.params)
    for name, command in group.commands.items():
        if command.hidden:
            continue
        usage = ["kdpipe", name]
        for p in command.params:
            if p.opts[0].startswith("-"):
                continue
            usage.append(p.name.upper() if p.required else f"[{p.name.upper()}]")
        out += [f"## `kdpipe {name}`", "", f"```\n{' '.join(usage)} [OPTIONS]\n```", "",
                (command.help or "").strip(), ""]
        out += _params_table(command.params)
    return "\n".join(out)


def _params_table(params) -> list[str]:
    if not params:
        return []
    lines = ["| argument or option | type | default | help |", "|---|---|---|---|"]
    for p in params:
        is_option = p.opts[0].startswith("-")
        shown = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts]) if is_option else f"`{p.name.upper()}`"
        if getattr(p, "metavar", None) and is_option:
            shown += f" `{p.metavar}`"
        kind = _annotation(p) + (" (repeatable)" if p.multiple else "")
        if p.required:
            default = "required"
        elif p.default in (None, False) or p.multiple:
            default = ""
        else:
            default = f"`{p.default}`"
        lines.append(f"| {shown} | {_cell(kind)} | {_cell(default)} | {_cell(p.help or '')} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------------- methods

def methods_reference() -> str:
    """Markdown: every method of the registry with its family, paper, year, formula summary and parameters (default,
    search range, when it acts), as `kdpipe methods` lists them."""
    from kdpipe.config_base import active_conditions, search_space
    from kdpipe.methods import BUILT_IN, origin, registry

    methods = registry()
    out = ["# Methods", "", "Generated when the site is built from the method registry (`kdpipe methods` prints the "
           "same). Each method's parameters go under `distill.params` in a pipeline file; the search range is what "
           "`search.space` draws with `auto`.", "",
           "| method | family | paper | year |", "|---|---|---|---|"]
    for name, cls in sorted(methods.items()):
        out.append(f"| [`{name}`](#{name.replace('+', '')}) | {cls.family} | {_cell(cls.paper)} | {cls.year or ''} |")
    out.append("")
    for name, cls in sorted(methods.items()):
        out += [f"## `{name}` {{ #{name.replace('+', '')} }}", "", f"**{_cell(cls.summary)}**", ""]
        facts = [f"family: {cls.family}"]
        if cls.paper:
            facts.append(f"paper: {cls.paper}" + (f" ({cls.year})" if cls.year else ""))
        if not cls.needs_teacher:
            facts.append("needs no teacher")
        if origin(name) != BUILT_IN:
            facts.append(f"plugin: {origin(name)}")
        example = ROOT / "pipelines" / f"{name}.yaml"
        if example.is_file():
            facts.append(f"example: `pipelines/{name}.yaml`")
        out += ["; ".join(facts), ""]
        space, conditions = search_space(cls.Params), active_conditions(cls.Params)
        fields = cls.Params.model_fields
        if not fields:
            out += ["No parameters (`distill.params: {}`).", ""]
            continue
        out += ["| parameter | default | search range | acts when | description |", "|---|---|---|---|---|"]
        for pname, field in fields.items():
            when = "; ".join(f"`{other}` in {allowed}" for other, allowed in conditions.get(pname, {}).items())
            default = field.default if not callable(getattr(field, "default_factory", None)) else field.default_factory()
            out.append(f"| `distill.params.{pname}` | {_cell(_code(_plain(default)))} | "
                       f"{_cell(_search({'search': space.get(pname)}))} | {_cell(when)} | {_cell(field.description or '')} |")
        out.append("")
    return "\n".join(out)


def _plain(value: Any) -> Any:
    """A default as JSON shows it (a pydantic model as its mapping)."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if dump else value


# ------------------------------------------------------------------------------------------------ the MkDocs hook

def on_files(files, config):
    """Add the generated reference pages to the build (nothing is written into docs/)."""
    from mkdocs.structure.files import File

    for path, writer in PAGES.items():
        files.append(File.generated(config, path, content=globals()[writer]()))
    return files
