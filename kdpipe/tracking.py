"""MLflow: where runs go (mlflow.yaml), one run per pipeline run, metrics, artifacts and the model registry."""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdpipe.errors import InputError
from kdpipe.locks import file_lock
from kdpipe.registry import RegistryPolicy

MLFLOW_CONFIG = "mlflow.yaml"


def serving_requirements() -> list[str]:
    """What the logged ONNX model needs to load and serve through MLflow, pinned as installed: the set MLflow infers
    by loading the model in a child process (6 s of every register stage), named instead."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(names):
        for name in names:
            try:
                yield f"{name}=={version(name)}"
            except PackageNotFoundError:
                continue

    runtime = next(installed(["onnxruntime", "onnxruntime-gpu"]), None)  # whichever build serves this machine
    return [*installed(["mlflow", "numpy", "onnx"]), *filter(None, [runtime])]


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "kdpipe"
    artifact_location: str | None = None
    # How long a tracking server may take to answer: the reachability check before a run, and each request's
    # timeout during it (MLflow's own retries are bounded by it too: see retry_environment).
    connect_timeout_s: float = 5.0
    # MLflow's own system metrics (CPU, memory, and GPU where present) beside the run's metrics.
    system_metrics: bool = True
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
    if not isinstance(values.get("system_metrics", True), bool):
        raise InputError("system_metrics", f"{path}: expected true or false, got {values['system_metrics']!r}")
    timeout = values.get("connect_timeout_s", TrackingConfig.connect_timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InputError("connect_timeout_s", f"{path}: expected a number of seconds > 0, got {timeout!r}")
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


class TrackingUnreachable(Exception):
    """The MLflow server does not answer (exit 3)."""

    exit_code = 3


def http_uris(config: TrackingConfig) -> list[str]:
    """The tracking and registry URIs that are MLflow servers (http, https), each once."""
    return list(dict.fromkeys(u for u in (config.tracking_uri, registry_uri(config))
                              if u.startswith(("http://", "https://"))))


def unreachable_reason(uri: str, timeout_s: float) -> str | None:
    """Why the MLflow server at `uri` does not answer within `timeout_s`, or None when it answers.

    Any HTTP answer counts as reachable (a server behind authentication may refuse /health); only a refused,
    reset or silent connection does not."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:  # a timeout while reading the answer, a reset connection
        return str(exc) or type(exc).__name__


def check_reachable(config: TrackingConfig) -> None:
    """Raise TrackingUnreachable, naming the URI, when an MLflow server of `config` does not answer."""
    for uri in http_uris(config):
        reason = unreachable_reason(uri, config.connect_timeout_s)
        if reason is not None:
            raise TrackingUnreachable(f"MLflow server {uri} did not answer within {config.connect_timeout_s:g}s "
                                      f"({reason})")


def retry_environment(config: TrackingConfig) -> dict[str, str]:
    """MLflow's HTTP retry settings bounded by connect_timeout_s. Its defaults (7 retries, backoff factor 2, 120 s
    timeout) keep a run silent for minutes when the server is down; these give up after three tries, about
    2 s of backoff apart, each waiting at most connect_timeout_s for an answer."""
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(math.ceil(config.connect_timeout_s)),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}


@contextmanager
def store_lock(config: TrackingConfig):
    """Serialize creating and migrating a sqlite store (and its experiment) between processes on one machine:
    MLflow's alembic migrations fail when two processes create the same empty store at once."""
    if not config.tracking_uri.startswith("sqlite:"):
        yield
        return
    from sqlalchemy.engine import make_url

    database = make_url(config.tracking_uri).database
    if database in (None, "", ":memory:"):
        yield
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        yield


def mlflow_client(config: TrackingConfig):
    """A client bound to `config`'s store, whatever URIs this process set globally before."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=config.tracking_uri, registry_uri=registry_uri(config))


class RunWriter:
    """Writes to MLflow runs by explicit run id through one client bound to a store, never through MLflow's
    process-global active run, experiment or URIs: two writers on different stores in one process keep apart.
    Tracker (the pipeline's run) and the search's TrialRuns (its trials) both write through it."""

    def __init__(self, client):
        self.client = client

    def create(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


class Tracker:
    """One MLflow run per pipeline run, written by run id (RunWriter) to the configured store and experiment."""

    def __init__(self, config: TrackingConfig):
        self.config = config
        self.run_id: str | None = None
        self._open = False  # the run is started and not yet ended by this tracker
        self._monitor = None
        # MLflow reads its retry settings from the environment at each request. Those the caller chose win;
        # end() removes the ones set here.
        self._retry_env_set = {k: v for k, v in retry_environment(config).items() if k not in os.environ}
        os.environ.update(self._retry_env_set)
        try:
            self.runs = RunWriter(mlflow_client(config))
            with store_lock(config):
                found = self.runs.client.get_experiment_by_name(config.experiment)
                self.experiment_id = found.experiment_id if found is not None else self.runs.client.create_experiment(
                    config.experiment, artifact_location=config.artifact_location)
        except BaseException:
            self.restore_environment()
            raise

    def start(self, run_name: str, tags: dict[str, str]) -> str:
        from mlflow.tracking.context.registry import resolve_tags  # the user, source and git tags mlflow.start_run adds

        self.run_id = self.runs.create(self.experiment_id, run_name, resolve_tags(tags))
        self._begin(resume=False)
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Continue an interrupted run (--resume): RUNNING again, system metrics continuing its steps."""
        self.run_id = run_id
        self.runs.client.update_run(run_id, status="RUNNING")
        self._begin(resume=True)

    def _begin(self, resume: bool) -> None:
        self._open = True
        if self.config.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                                 tracking_uri=self.config.tracking_uri)
            self._monitor.start()

    def log_params(self, params: dict[str, Any]) -> None:
        self.runs.log_params(self.run_id, {k: ("null" if v is None else v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.runs.log_metrics(self.run_id, metrics, step)

    def logged_epochs(self, label: str, before: int) -> dict[int, dict[str, float]]:
        """The per-epoch metrics this run logged as `label/NAME` at steps below `before` (epoch → NAME → value):
        what a resumed stage logged before it was interrupted."""
        client = self.runs.client
        found: dict[int, dict[str, float]] = {}
        for key in client.get_run(self.run_id).data.metrics:
            scope, _, name = key.partition("/")
            if scope == label:
                for metric in client.get_metric_history(self.run_id, key):
                    if metric.step < before:
                        found.setdefault(metric.step, {})[name] = metric.value
        return dict(sorted(found.items()))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.runs.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, value: dict, artifact_file: str) -> None:
        self.runs.client.log_dict(self.run_id, value, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.runs.set_tags(self.run_id, tags)

    def end(self, status: str) -> None:
        """End the run with `status` (once: a second call, after the first failed at the server, does nothing) and
        remove the retry settings set here, even when the server fails."""
        try:
            if self._open:
                self._open = False
                if self._monitor is not None:
                    self._monitor.finish()
                    self._monitor = None
                self.runs.end(self.run_id, status)
        finally:
            self.restore_environment()

    def restore_environment(self) -> None:
        for name in self._retry_env_set:
            os.environ.pop(name, None)
        self._retry_env_set = {}

    @contextmanager
    def _fluent(self):
        """MLflow's fluent model API (log_model, register_model) reads the process-global tracking and registry
        URIs: they name this store for the block only, then what the caller's environment names again."""
        import mlflow

        caller = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.config.tracking_uri)
        # Set explicitly: a registry URI left over in this process would otherwise win over the tracking URI.
        mlflow.set_registry_uri(registry_uri(self.config))
        try:
            yield mlflow
        finally:
            mlflow.set_tracking_uri(caller["MLFLOW_TRACKING_URI"])
            mlflow.set_registry_uri(caller["MLFLOW_REGISTRY_URI"])
            for name, value in caller.items():  # set_*_uri write these variables too
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
        # Made here, in this run's experiment, with the run's params: the fluent API would file a model logged by
        # run id under the process's active experiment. No active run is started.
        params = self.runs.client.get_run(self.run_id).data.params
        model = self.runs.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                     params=params)
        with self._fluent() as mlflow:
            return mlflow.onnx.log_model(onnx.load(str(onnx_path)), name=name, signature=signature,
                                         input_example=example, save_as_external_data=False,
                                         pip_requirements=serving_requirements(),
                                         onnx_execution_providers=providers, run_id=self.run_id,
                                         model_id=model.model_id)

    def register_model(self, model_uri: str, model_name: str, tags: dict[str, str]) -> str:
        """A new version of `model_name` with `tags`; returns the version number."""
        with self._fluent() as mlflow:
            return str(mlflow.register_model(model_uri, model_name, tags=tags).version)

    def client(self):
        return self.runs.client
