"""The `kdpipe` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdpipe.errors import GateFailed, InputError, RunInterrupted, StageFailed
from kdpipe.tracking import TrackingUnreachable

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill a trained classifier into a small student and ship it as a validated ONNX model.")

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a key: --set distill.params.temperature=8")]
DebugOption = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


def _show_version(value: bool) -> None:
    if value:
        from kdpipe.versions import versions

        found = versions()
        libraries = ", ".join(f"{k} {found[k] or 'not installed'}" for k in ("python", "torch", "onnxruntime", "mlflow"))
        typer.echo(f"kdpipe {found['kdpipe']} ({libraries})")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                   help="print kdpipe's version and those of torch, onnxruntime "
                                                        "and mlflow, then exit")] = False) -> None:
    """Distill a trained classifier into a small student and ship it as a validated ONNX model."""


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


@contextlib.contextmanager
def exits(file: str | None, debug: bool, stage: str = "setup"):
    """The one way a command ends badly: one line on stderr (no traceback unless --debug) and the exit code of the
    error (DESIGN.md: Failure model); an error no check foresaw is a run-time failure in `stage` (exit 3)."""
    try:
        yield
    except typer.Exit:
        raise
    except (InputError, GateFailed, StageFailed, TrackingUnreachable, RunInterrupted) as exc:
        _fail(exc, file, debug)
    except Exception as exc:  # noqa: BLE001 - e.g. an MLflow store that cannot be reached
        _fail(StageFailed(stage, exc), file, debug)


# What `kdpipe init` writes into the working directory, from the files installed with the package.
INIT_FILES = {"pipeline.yaml": ("kdpipe.pipelines", "digits.yaml"), "mlflow.yaml": ("kdpipe", "mlflow.yaml")}


@app.command()
def init() -> None:
    """Write the default pipeline (pipeline.yaml, the digits example) and mlflow.yaml into the working directory,
    ready for `kdpipe run pipeline.yaml`. Refuses (exit 2) when either file exists."""
    from importlib.resources import files

    for name in INIT_FILES:
        if Path(name).exists():
            _fail(InputError("", "exists; kdpipe init writes only new files (move it away or run elsewhere)"), name,
                  False)
    for name, (package, resource) in INIT_FILES.items():
        Path(name).write_text(files(package).joinpath(resource).read_text())
        typer.echo(f"wrote {name}", err=True)
    typer.echo("next: kdpipe run pipeline.yaml")


@app.command()
def run(
    pipeline: Annotated[Path | None, typer.Argument(help="pipeline YAML file (not with --resume)")] = None,
    set_: SetOption = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="where run directories go")] = Path("runs"),
    mlflow_config: Annotated[Path | None, typer.Option("--mlflow-config", help="default: ./mlflow.yaml")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue an interrupted run from its run directory "
                                                                 "(runs/NAME/RUN_ID), in the same MLflow run")] = None,
    until: Annotated[str | None, typer.Option("--until", metavar="STAGE", help="stop after the stage of this name, "
                                              "as the progress lines name them (an unknown name lists them); "
                                              "--resume continues later")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", metavar="S,S,...", help="run once per seed as nested runs "
                                              "of one parent run, reporting mean ± std (overrides the seeds: "
                                              "key)")] = None,
    debug: DebugOption = False,
) -> None:
    """Run the pipeline's stages, from training the teacher to registering the student. Prints report.json's path
    last.

    Under `torchrun --nproc-per-node N -m kdpipe run FILE` every process trains on its share of each batch, their
    gradients averaged after each step (no search: use `kdpipe search` workers); rank 0 alone then exports,
    validates, registers and prints. SIGTERM or SIGINT ends the run as killed (report.json, MLflow status KILLED),
    exit 128 + the signal number.
    """
    from kdpipe import gc_tuning

    shown = str(resume if pipeline is None else pipeline)
    with gc_tuning.frozen_while_running(), exits(shown, debug):
        with gc_tuning.imports_uncollected():  # torch and the stages' modules: they live as long as the process
            from kdpipe.launch import launch
        if (pipeline is None) == (resume is None):
            raise InputError("", "give a pipeline file, or --resume RUN_DIR to continue an interrupted run")
        if resume is not None and set_:
            raise InputError("--set", "a resumed run keeps its pipeline (run_dir/pipeline.yaml); --set cannot change it")
        overrides = set_ or []
        if seeds is not None:
            overrides = [*overrides, *seeds_override(seeds, overrides, resume)]
        report_path, report = launch(pipeline, overrides, runs_dir, mlflow_config=mlflow_config, resume=resume,
                                     until=until)
        if report_path is not None:  # None: a torchrun rank other than 0, rank 0 reports
            _report_outcome(report_path, report)


def seeds_override(text: str, overrides: list[str], resume: Path | None) -> list[str]:
    """`--seeds 0,1,2` as the override of the seeds: key it is; InputError where it contradicts another setting."""
    from kdpipe.seeds import parse_seeds

    if resume is not None:
        raise InputError("--seeds", "a resumed run keeps the seeds it started with (run_dir/pipeline.yaml)")
    if any(o.partition("=")[0] == "seeds" for o in overrides):
        raise InputError("--seeds", "given twice: with --seeds and with --set seeds=; keep one")
    return [f"seeds={json.dumps(parse_seeds(text))}"]


def _report_outcome(report_path: Path, report: dict) -> None:
    """One summary line on stderr, report.json's path on stdout; GateFailed (exit 1) naming the failed gates."""
    if report["status"] == "stopped":
        typer.echo(f"stopped after {report['stopped_after']}; continue with: kdpipe run --resume {report_path.parent}",
                   err=True)
        typer.echo(str(report_path))
        return
    student = report.get("student") or {}
    teacher = report.get("teacher") or {}
    over = f" (mean over seeds {', '.join(map(str, report['seeds']['seeds']))})" if "seeds" in report else ""
    summary = f"status {report['status']}{over}: student accuracy {student.get('accuracy', float('nan')):.4f}"
    if teacher:
        summary += f", teacher {teacher['accuracy']:.4f}"
    typer.echo(summary, err=True)
    typer.echo(str(report_path))
    if report["status"] != "passed":
        raise GateFailed(", ".join(name for name, g in report["gates"].items() if not g["passed"]))


@app.command()
def validate(
    model: Annotated[Path, typer.Argument(help="ONNX classifier: float32 input (batch, *sample shape), or uint8 "
                                               "images where the data are 8-bit images; logits output")],
    pipeline: Annotated[Path, typer.Option("--pipeline", help="pipeline YAML file whose data, teacher and gates apply")],
    set_: SetOption = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="where run directories go")] = Path("runs"),
    mlflow_config: Annotated[Path | None, typer.Option("--mlflow-config", help="default: ./mlflow.yaml")] = None,
    debug: DebugOption = False,
) -> None:
    """Validate any ONNX classifier against a pipeline's test split and gates (the teacher comes from the pipeline).
    Writes the same report.json as `run` and prints its path last; exit 1 when a gate fails."""
    from kdpipe.runner import run_pipeline

    with exits(str(pipeline), debug):
        report_path, report = run_pipeline(pipeline, set_ or [], runs_dir, mlflow_config=mlflow_config, onnx_model=model)
        _report_outcome(report_path, report)


@app.command()
def promote(
    model_name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Option("--version", min=1, help="the model version to promote")],
    alias: Annotated[str, typer.Option("--alias", help="the alias to move")] = "champion",
    force: Annotated[bool, typer.Option("--force", help="move the alias even when the checks refuse (recorded in a "
                                                        "version tag)")] = False,
    mlflow_config: Annotated[Path | None, typer.Option("--mlflow-config", help="default: ./mlflow.yaml")] = None,
    debug: DebugOption = False,
) -> None:
    """Move ALIAS to a version that passed every gate and beats the alias's current holder on the primary metric
    by at least min_improvement (registry policy in mlflow.yaml). Exit 1 when refused."""
    from kdpipe.config import registry_alias
    from kdpipe.registry import promote as promote_version
    from kdpipe.tracking import load_tracking_config, mlflow_client

    with exits(None, debug, "promote"):
        registry_alias(alias, "--alias")
        tracking = load_tracking_config(mlflow_config)
        client = mlflow_client(tracking)
        verdict = promote_version(client, tracking.registry, model_name, str(version), alias, force)
    if not verdict.allowed:
        typer.echo(f"refused: '{alias}' stays on version {verdict.current}: {verdict.reason} (--force overrides)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{model_name} version {version} is '{alias}': {verdict.reason}")


@app.command()
def search(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML file")],
    storage: Annotated[str, typer.Option("--storage", help="sqlite:///FILE, postgresql://USER:PW@HOST/DB, "
                                                           "or a file path (Optuna's journal file)")],
    study: Annotated[str | None, typer.Option("--study", help="study name; default: search.study or the pipeline's name")] = None,
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="trials this worker runs; default: search.trials")] = None,
    set_: SetOption = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="where run directories go")] = Path("runs"),
    mlflow_config: Annotated[Path | None, typer.Option("--mlflow-config", help="default: ./mlflow.yaml")] = None,
    debug: DebugOption = False,
) -> None:
    """Run one search worker: teacher, then trials on a shared study. Start any number on one study."""
    from kdpipe.launch import launch

    # JSON strings are YAML strings: a study named 2024 or a path with colons stays a string.
    overrides = [*(set_ or []), f"search.storage={json.dumps(storage)}"]
    overrides += [f"search.study={json.dumps(study)}"] if study else []
    overrides += [f"search.trials={trials}"] if trials else []
    with exits(str(pipeline), debug):
        report_path, report = launch(pipeline, overrides, runs_dir, mlflow_config=mlflow_config, until="search")
    found = report["search"]
    typer.echo(f"study {found['study']}: {found['n_trials']} trials ({found['n_complete']} complete, "
               f"{found['n_pruned']} pruned, {found['n_failed']} failed), best {found['best_value']} "
               f"with {found['best_params']}", err=True)
    typer.echo(str(report_path))


@app.command()
def check(pipeline: Annotated[Path, typer.Argument(help="pipeline YAML file")], set_: SetOption = None,
          debug: DebugOption = False) -> None:
    """Validate a pipeline file and the inputs it names, without running anything."""
    from kdpipe.cache_store import check_cache_dir
    from kdpipe.pipeline import provider_warnings
    from kdpipe.prepare import prepare

    with exits(str(pipeline), debug, "check"):  # an input no check foresaw: still one line, never a traceback
        check_cache_dir(None, None)  # KDPIPE_CACHE_DIR when set; check takes no --runs-dir
        prepared = prepare(pipeline, set_ or [])
    for line in provider_warnings(prepared.pipeline):
        typer.echo(f"{pipeline}: {line}", err=True)
    sizes = prepared.data.sizes()
    typer.echo(f"{pipeline}: ok ({prepared.pipeline.distill.method}; train {sizes['train']}, val {sizes['val']}, "
               f"test {sizes['test']}, {prepared.data.num_classes} classes)")


@app.command()
def taps(pipeline: Annotated[Path, typer.Argument(help="pipeline YAML file")], set_: SetOption = None,
         debug: DebugOption = False) -> None:
    """List both models' module paths with their output shapes (for `distill.taps`), and the pairs the method uses."""
    from kdpipe.methods import FeatureMethod, get_method
    from kdpipe.prepare import prepare
    from kdpipe.taps import output_shapes

    with exits(str(pipeline), debug, "taps"):
        prepared = prepare(pipeline, set_ or [], check_models=False)
    shape_of = lambda s: "×".join(map(str, s)) if isinstance(s, tuple) else s  # noqa: E731
    typer.echo(f"per-sample output shapes for inputs of shape {shape_of(prepared.data.input_shape)}; "
               "* default tap, e embedding tap, p pre-ReLU tap")
    for role, model in (("teacher", prepared.teacher), ("student", prepared.student)):
        if model is None:
            continue
        typer.echo(f"{role}:")
        shapes = output_shapes(model, prepared.data.input_shape)
        width = max(map(len, shapes), default=0)
        defaults, embedding = getattr(model, "default_taps", []) or [], getattr(model, "embedding_tap", None)
        preact = getattr(model, "preact_taps", []) or []
        for path, shape in shapes.items():
            mark = (("*" if path in defaults else " ") + ("e" if path == embedding else " ")
                    + ("p" if path in preact else " "))
            typer.echo(f"  {path:<{width}}  {mark}  {shape_of(shape)}")
    cfg, method_cls = prepared.pipeline.distill, get_method(prepared.pipeline.distill.method)
    with exits(str(pipeline), debug, "taps"):
        if issubclass(method_cls, FeatureMethod) and prepared.teacher is not None:
            for pair in method_cls.tap_pairs(cfg.params, prepared.student, prepared.teacher,
                                             cfg.taps, prepared.data.input_shape):
                typer.echo(f"{cfg.method} compares {pair.describe()}")
        else:
            method_cls.check_models(prepared.pipeline, student=prepared.student, teacher=prepared.teacher,
                                    input_shape=prepared.data.input_shape)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files: every method's, source's and augmentation step's keys, plugins'
    included (their names and packages under x-kdpipe-plugins)."""
    from kdpipe.pipeline import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def methods() -> None:
    """List the distillation methods with their family, paper and year, their parameters, defaults and search
    ranges; a plugin's method names the package it comes from."""
    from kdpipe.config_base import active_conditions, search_space
    from kdpipe.methods import BUILT_IN, origin, registry

    for name, cls in sorted(registry().items()):
        source = "" if origin(name) == BUILT_IN else f" [plugin: {origin(name)}]"
        typer.echo(f"{name}: {cls.summary}{source}")
        typer.echo(f"    family: {cls.family}" + (f"; paper: {cls.paper}" if cls.paper else "")
                   + (f"; year: {cls.year}" if cls.year else ""))
        space, conditions = search_space(cls.Params), active_conditions(cls.Params)
        for pname, field in cls.Params.model_fields.items():
            rng = space.get(pname)
            if rng is None:
                shown = ""
            elif "choices" in rng:
                shown = f"  search {rng['choices']}"
            else:
                shown = f"  search [{rng['low']}, {rng['high']}]{' log' if rng['log'] else ''}"
            when = "".join(f"  when {other} in {allowed}" for other, allowed in conditions.get(pname, {}).items())
            about = f"  # {field.description}" if field.description else ""
            typer.echo(f"    {pname} = {field.default!r}{shown}{when}{about}")


@app.command()
def models(
    input_shape: Annotated[str, typer.Option("--input", help="per-sample input shape C,H,W")] = "3,32,32",
    classes: Annotated[int, typer.Option("--classes", min=1, help="number of classes")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list of {arch, params}")] = False,
) -> None:
    """List the zoo architectures with their parameter counts for this input and class count."""
    from kdpipe.models import ZOO, count_params

    try:
        shape = tuple(int(v) for v in input_shape.split(","))
        if not shape or min(shape) < 1:
            raise ValueError
    except ValueError:
        _fail(InputError("--input", f"expected positive integers like 3,32,32, got '{input_shape}'"), None, False)
    rows = []
    for arch, build in ZOO.items():
        try:
            rows.append({"arch": arch, "params": count_params(build(shape, classes))})
        except InputError:  # an architecture that cannot take this input (a CNN on flat vectors)
            rows.append({"arch": arch, "params": None})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        shown = f"{row['params']:,}" if row["params"] is not None else "does not take this input"
        typer.echo(f"{row['arch']:<12} {shown}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", help="run directories (runs/NAME/RUN_ID)")],
    out: Annotated[Path, typer.Option("--out", help="where the HTML page goes")] = Path("compare.html"),
    debug: DebugOption = False,
) -> None:
    """Compare runs (methods, seeds) from their report.json: OUT gets report.html's figures side by side, stdout a
    Markdown table with one row per run (for a CI comment). Exit 2 when a RUN_DIR has no report.json."""
    from kdpipe.atomic import atomic_write
    from kdpipe.compare import markdown_table, read_reports
    from kdpipe.html_report import render_compare

    with exits(None, debug, "compare"):
        reports = read_reports(run_dirs)
        with atomic_write(out) as tmp:
            tmp.write_text(render_compare(reports), encoding="utf-8")
    typer.echo(f"wrote {out}", err=True)
    typer.echo(markdown_table(reports), nl=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        from kdpipe import gc_tuning

        gc_tuning.freeze()  # the interpreter's teardown then skips collecting what is alive (2.4 s after a run)


if __name__ == "__main__":
    main()
