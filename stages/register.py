"""register: a passing model becomes a new registry version (alias `candidate`); the champion alias moves to it
only when the registry policy in mlflow.yaml says it beats the current champion (kdpipe.registry)."""

from __future__ import annotations

from kdpipe.registry import promote, version_tags


def run(ctx) -> None:
    cfg = ctx.pipeline.registry
    mlflow_report = ctx.report["mlflow"]
    if not ctx.gates_passed:
        failed = [g.name for g in ctx.gates if not g.passed]
        mlflow_report["registry"] = f"not registered: gate failed: {', '.join(failed)}"
        return
    example = ctx.data.x_val[:1].cpu().numpy()
    info = ctx.tracker.log_onnx_model(ctx.artifacts["onnx_path"], "student", example,
                                      ctx.report["validate"]["providers_used"])
    mlflow_report["model_uri"] = info.model_uri
    if cfg is None:
        mlflow_report["registry"] = "not registered: the pipeline has no register section"
        return
    policy = ctx.tracker.config.registry
    tags = version_tags(ctx.report, ctx.gates, ctx.pipeline.name, ctx.run_dir / "pipeline.yaml", ctx.pipeline_file)
    version = ctx.tracker.register_model(info.model_uri, cfg.model_name, tags)
    client = ctx.tracker.client()
    client.set_registered_model_alias(cfg.model_name, policy.candidate_alias, version)
    verdict = promote(client, policy, cfg.model_name, version, cfg.alias)
    ctx.progress.info(f"  version {version} is '{policy.candidate_alias}'; "
                      f"'{cfg.alias}' {'moves to it' if verdict.allowed else 'stays'}: {verdict.reason}")
    mlflow_report.update({
        "model_name": cfg.model_name, "model_version": version,
        "aliases": [policy.candidate_alias] + ([cfg.alias] if verdict.allowed else []),
        "alias": cfg.alias if verdict.allowed else None,
        "registry": verdict.reason,
    })
