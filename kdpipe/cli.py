"""The `kdpipe` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdpipe.errors import GateFailed, InputError, StageFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill a trained classifier into a small student and ship it as a validated ONNX model.")

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a key: --set distill.params.temperature=8")]
DebugOption = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


def _fail(exc: BaseException, file: str | None, debug: bool) -> None:
    if debug:
        raise exc
    if isinstance(exc, InputError):
        message = exc.format(file)
    elif isinstance(exc, GateFailed):
        message = f"gate failed: {exc}"
    else:
        message = f"error: {exc}"
    typer.echo(message.replace("\n", " "), err=True)
    raise typer.Exit(getattr(exc, "exit_code", 3))


@app.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML file")],
    set_: SetOption = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="where run directories go")] = Path("runs"),
    mlflow_config: Annotated[Path | None, typer.Option("--mlflow-config", help="default: ./mlflow.yaml")] = None,
    debug: DebugOption = False,
) -> None:
    """Run the pipeline: teacher → distill → export → validate → register. Prints report.json's path last."""
    from kdpipe.runner import run_pipeline

    try:
        report_path, report = run_pipeline(pipeline, set_ or [], runs_dir, mlflow_config=mlflow_config)
    except (InputError, StageFailed) as exc:
        _fail(exc, str(pipeline), debug)
    except Exception as exc:  # anything outside a stage (MLflow store unreachable, ...) is a run-time failure
        _fail(StageFailed("setup", exc), str(pipeline), debug)
    student = report.get("student") or {}
    teacher = report.get("teacher") or {}
    summary = f"status {report['status']}: student accuracy {student.get('accuracy', float('nan')):.4f}"
    if teacher:
        summary += f", teacher {teacher['accuracy']:.4f}"
    typer.echo(summary, err=True)
    typer.echo(str(report_path))
    if report["status"] != "passed":
        failed = [name for name, g in report["gates"].items() if not g["passed"]]
        typer.echo(f"gate failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@app.command()
def check(pipeline: Annotated[Path, typer.Argument(help="pipeline YAML file")], set_: SetOption = None,
          debug: DebugOption = False) -> None:
    """Validate a pipeline file and the inputs it names, without running anything."""
    from kdpipe.runner import prepare

    try:
        prepared = prepare(pipeline, set_ or [])
    except InputError as exc:
        _fail(exc, str(pipeline), debug)
    sizes = prepared.data.sizes()
    typer.echo(f"{pipeline}: ok ({prepared.pipeline.distill.method}; train {sizes['train']}, val {sizes['val']}, "
               f"test {sizes['test']}, {prepared.data.num_classes} classes)")


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files."""
    from kdpipe.config import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def methods() -> None:
    """List the distillation methods with their parameters, defaults and search ranges."""
    from kdpipe.methods import registry, search_space

    for name, cls in sorted(registry().items()):
        typer.echo(f"{name}: {cls.summary}")
        space = search_space(cls.Params)
        for pname, field in cls.Params.model_fields.items():
            rng = space.get(pname)
            if rng is None:
                shown = ""
            elif "choices" in rng:
                shown = f"  search {rng['choices']}"
            else:
                shown = f"  search [{rng['low']}, {rng['high']}]{' log' if rng['log'] else ''}"
            typer.echo(f"    {pname} = {field.default!r}{shown}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
