"""register: log the ONNX model to MLflow, register a version, and set the alias only when every gate passed."""

from __future__ import annotations


def run(ctx) -> None:
    cfg = ctx.pipeline.registry
    example = ctx.data.x_val[:1].cpu().numpy()
    info = ctx.tracker.log_onnx_model(ctx.artifacts["onnx_path"], "student", example,
                                      cfg.model_name if cfg else None, ctx.report["validate"]["providers_used"])
    ctx.report["mlflow"]["model_uri"] = info.model_uri
    if cfg is None:
        return
    version = str(info.registered_model_version)
    passed = ctx.gates_passed
    ctx.tracker.set_version_tags(cfg.model_name, version, {
        "kdpipe.status": "passed" if passed else "failed",
        "kdpipe.pipeline": ctx.pipeline.name,
        "kdpipe.method": ctx.pipeline.distill.method,
        "kdpipe.test_accuracy": str(ctx.report["student"].get("accuracy")),
    })
    if passed:
        ctx.tracker.set_alias(cfg.model_name, cfg.alias, version)
    ctx.report["mlflow"].update({"model_name": cfg.model_name, "model_version": version,
                                 "alias": cfg.alias if passed else None})
