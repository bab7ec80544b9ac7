"""register: a passing model becomes a new registry version (alias `candidate`); the champion alias moves to it
only when the registry policy in mlflow.yaml says it beats the current champion (kdpipe.registry)."""

from __future__ import annotations

from kdpipe.models.adapter import graph_inputs
from kdpipe.onnx_export import takes_uint8
from kdpipe.registry import alias_holder, promote, version_tags
from kdpipe.results import ExportResult, RegisterResult, Stage, ValidateResult


class Register(Stage):
    name = "register"
    needs = (ExportResult, ValidateResult)
    produces = RegisterResult
    main_rank_only = True

    def run(self, ctx) -> RegisterResult:
        cfg = ctx.pipeline.registry
        if not ctx.results.gates_passed:
            failed = [g.name for g in ctx.results.gates if not g.passed]
            return RegisterResult(report={"mlflow": {"registry": f"not registered: gate failed: {', '.join(failed)}"}})
        client = ctx.tracker.client()
        earlier = registered_by_run(client, cfg.model_name, ctx.tracker.run_id) if cfg is not None else None
        if earlier is not None:
            # Killed in this stage after registering: --resume goes on with that version, not a second one.
            version, model_uri = str(earlier.version), earlier.source
            ctx.progress.info(f"  version {version} was registered by this run before it was interrupted; reusing it")
        else:
            model_uri = log_model(ctx)
            if cfg is None:
                return RegisterResult(model_uri=model_uri, report={"mlflow": {
                    "model_uri": model_uri, "registry": "not registered: the pipeline has no register section"}})
            tags = version_tags(ctx.results[ValidateResult], ctx.results[ExportResult], ctx.results.gates,
                                ctx.pipeline, ctx.run_dir, ctx.pipeline_file)
            version = ctx.tracker.register_model(model_uri, cfg.model_name, tags)
        policy = ctx.tracker.config.registry
        client.set_registered_model_alias(cfg.model_name, policy.candidate_alias, version)
        verdict = promote(client, policy, cfg.model_name, version, cfg.alias)
        # Read back rather than inferred from the verdict: a resumed run's version may have taken the alias before.
        holder = alias_holder(client, cfg.model_name, cfg.alias)
        holds = holder is not None and str(holder.version) == version
        ctx.progress.info(f"  version {version} is '{policy.candidate_alias}'; "
                          f"'{cfg.alias}' {'moves to it' if holds else 'stays'}: {verdict.reason}")
        return RegisterResult(model_uri=model_uri, model_name=cfg.model_name, version=version, report={"mlflow": {
            "model_uri": model_uri, "model_name": cfg.model_name, "model_version": version,
            "aliases": [policy.candidate_alias] + ([cfg.alias] if holds else []),
            "alias": cfg.alias if holds else None, "registry": verdict.reason}})


def log_model(ctx) -> str:
    """The delivered model as this run's MLflow model, with a signature; returns its URI."""
    path = ctx.results[ValidateResult].onnx_path
    # The signature's input dtype is the graph's: uint8 images for `export.input: uint8`, else float32.
    graph_input = "uint8" if takes_uint8(path) else "float"
    example = graph_inputs(ctx.data, "val", graph_input)[:1].cpu().numpy()
    info = ctx.tracker.log_onnx_model(path, "student", example, ctx.results[ValidateResult].providers_used)
    return info.model_uri


def registered_by_run(client, model_name: str, run_id: str):
    """The newest version of `model_name` made from MLflow run `run_id`, or None. The registry records each
    version's source run, so this holds even when the process died before the ledger noted the version."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == model_name]
    return max(versions, key=lambda v: int(v.version), default=None)
