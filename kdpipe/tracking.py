"""MLflow: where runs go (mlflow.yaml), one run per pipeline run, metrics, artifacts and the model registry."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdpipe.errors import InputError
from kdpipe.registry import RegistryPolicy

MLFLOW_CONFIG = "mlflow.yaml"


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "kdpipe"
    artifact_location: str | None = None
    registry: RegistryPolicy = field(default_factory=RegistryPolicy)


def load_tracking_config(path: Path | None = None) -> TrackingConfig:
    """mlflow.yaml from `path` or the working directory; MLFLOW_TRACKING_URI wins over the file."""
    path = Path(path) if path else Path.cwd() / MLFLOW_CONFIG
    values: dict[str, Any] = {}
    if path.is_file():
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError("", f"{path}: YAML syntax error: {exc}") from None
        known = set(TrackingConfig.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(unknown[0], f"{path}: unknown key; valid keys: {', '.join(sorted(known))}")
    try:
        values["registry"] = RegistryPolicy.model_validate(values.get("registry") or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(["registry", *map(str, err["loc"])])
        raise InputError(key, f"{path}: {err['msg']}, got {err.get('input')!r}") from None
    config = TrackingConfig(**values)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        config.tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    return config


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys, for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def registry_uri(config: TrackingConfig) -> str:
    """Models are registered in the tracking store. Not MLFLOW_REGISTRY_URI: mlflow.set_registry_uri writes that
    variable, so a value left by earlier code in this process would silently win."""
    return config.tracking_uri


def mlflow_client(config: TrackingConfig):
    """A client bound to `config`'s store, whatever URIs this process set globally before."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=config.tracking_uri, registry_uri=registry_uri(config))


class Tracker:
    """One MLflow run per pipeline run."""

    def __init__(self, config: TrackingConfig):
        import mlflow

        self.mlflow = mlflow
        self.config = config
        # mlflow.set_*_uri also write these variables; end() puts back what the caller had.
        self._caller_uris = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(config.tracking_uri)
        # Set explicitly: a registry URI left over in this process would otherwise win over the tracking URI.
        mlflow.set_registry_uri(registry_uri(config))
        if mlflow.get_experiment_by_name(config.experiment) is None:
            mlflow.create_experiment(config.experiment, artifact_location=config.artifact_location)
        mlflow.set_experiment(config.experiment)
        self.run_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str]) -> str:
        run = self.mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params({k: ("null" if v is None else v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def end(self, status: str) -> None:
        if self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)
        self.mlflow.set_tracking_uri(self._caller_uris["MLFLOW_TRACKING_URI"])
        self.mlflow.set_registry_uri(self._caller_uris["MLFLOW_REGISTRY_URI"])
        for name, value in self._caller_uris.items():
            if value is None:
                os.environ.pop(name, None)

    def log_onnx_model(self, onnx_path: Path, name: str, example, providers: list[str]):
        """Log the ONNX model to the run with a signature and an input example; returns its ModelInfo."""
        import numpy as np
        import onnx
        from mlflow.models import infer_signature

        from kdpipe.onnx_runtime import predict, session

        outputs = predict(session(onnx_path), example)
        signature = infer_signature(example, outputs.astype(np.float32))
        return self.mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name=name, signature=signature, input_example=example,
            save_as_external_data=False, onnx_execution_providers=providers,
        )

    def register_model(self, model_uri: str, model_name: str, tags: dict[str, str]) -> str:
        """A new version of `model_name` with `tags`; returns the version number."""
        return str(self.mlflow.register_model(model_uri, model_name, tags=tags).version)

    def client(self):
        return mlflow_client(self.config)
