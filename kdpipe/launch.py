"""The way into a run from the command line: a pipeline with `seeds` (or the run directory of a multi-seed run) runs
once per seed under one parent (kdpipe.seeds); any other runs once (kdpipe.runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.runner import run_pipeline
from kdpipe.seeds import is_multi_seed, run_seeds


def launch(pipeline_file: Path | None, overrides: list[str], runs_dir: Path, mlflow_config: Path | None = None,
           until: str | None = None, resume: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Run the pipeline (or continue `resume`) through `until`; return (report path, report) as run_pipeline does."""
    if is_multi_seed(pipeline_file, overrides, resume):
        return run_seeds(pipeline_file, overrides, runs_dir, None, mlflow_config, until, resume)
    return run_pipeline(pipeline_file, overrides, runs_dir, mlflow_config=mlflow_config, until=until, resume=resume)
