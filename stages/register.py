"""register: a passing model becomes a new registry version (alias `candidate`); the champion alias moves to it
only when the registry policy in mlflow.yaml says it beats the current champion (kdpipe.registry)."""

from __future__ import annotations

from kdpipe.models.adapter import graph_inputs
from kdpipe.onnx_export import takes_uint8
from kdpipe.registry import alias_holder, promote, version_tags


def run(ctx) -> None:
    cfg = ctx.pipeline.registry
    mlflow_report = ctx.report["mlflow"]
    if not ctx.gates_passed:
        failed = [g.name for g in ctx.gates if not g.passed]
        mlflow_report["registry"] = f"not registered: gate failed: {', '.join(failed)}"
        return
    client = ctx.tracker.client()
    earlier = registered_by_run(client, cfg.model_name, ctx.tracker.run_id) if cfg is not None else None
    if earlier is not None:
        # This run was killed in this stage after registering: --resume goes on with that version, not a second one.
        version = str(earlier.version)
        mlflow_report["model_uri"] = earlier.source
        ctx.progress.info(f"  version {version} was registered by this run before it was interrupted; reusing it")
    else:
        # The signature's input dtype is the graph's: uint8 images for `export.input: uint8`, else float32.
        graph_input = "uint8" if takes_uint8(ctx.artifacts["onnx_path"]) else "float"
        example = graph_inputs(ctx.data, "val", graph_input)[:1].cpu().numpy()
        info = ctx.tracker.log_onnx_model(ctx.artifacts["onnx_path"], "student", example,
                                          ctx.report["validate"]["providers_used"])
        mlflow_report["model_uri"] = info.model_uri
        if cfg is None:
            mlflow_report["registry"] = "not registered: the pipeline has no register section"
            return
        tags = version_tags(ctx.report, ctx.gates, ctx.pipeline.name, ctx.run_dir / "pipeline.yaml", ctx.pipeline_file)
        version = ctx.tracker.register_model(info.model_uri, cfg.model_name, tags)
    policy = ctx.tracker.config.registry
    client.set_registered_model_alias(cfg.model_name, policy.candidate_alias, version)
    verdict = promote(client, policy, cfg.model_name, version, cfg.alias)
    # Read back rather than inferred from the verdict: a resumed run's version may have taken the alias before.
    holder = alias_holder(client, cfg.model_name, cfg.alias)
    holds = holder is not None and str(holder.version) == version
    ctx.progress.info(f"  version {version} is '{policy.candidate_alias}'; "
                      f"'{cfg.alias}' {'moves to it' if holds else 'stays'}: {verdict.reason}")
    mlflow_report.update({
        "model_name": cfg.model_name, "model_version": version,
        "aliases": [policy.candidate_alias] + ([cfg.alias] if holds else []),
        "alias": cfg.alias if holds else None,
        "registry": verdict.reason,
    })


def registered_by_run(client, model_name: str, run_id: str):
    """The newest version of `model_name` made from MLflow run `run_id`, or None. The registry records each
    version's source run, so this holds even when the process died before the ledger noted the version."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == model_name]
    return max(versions, key=lambda v: int(v.version), default=None)
