"""The pipeline's stages, one module each, each with `run(ctx) -> None` (installed as kdpipe.stages)."""
