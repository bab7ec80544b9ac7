"""Optuna search campaigns: the search space from the pipeline file, storages shared by workers, and the trials.

A campaign trains one student per trial with the parameters Optuna suggests,
reusing one teacher-output cache across trials (the teacher is frozen), and
records every trial as a nested MLflow run under the campaign's run. Workers
in separate processes or machines cooperate on one study through Optuna's
storage: sqlite, PostgreSQL, or Optuna's journal file.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdpipe.config import ChoicesSpec, OptimizerConfig, RangeSpec, _input_error, _suggest
from kdpipe.errors import InputError
from kdpipe.methods import active_conditions, get_method, registry, search_space
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.inference import accuracy
from kdpipe.train import Trainer

OPTIMIZER = "optimizer."  # space keys naming distill.optimizer settings (lr, momentum, weight_decay, ...)
DIRECTIONS = {"val_accuracy": "maximize", "latency_p50": "minimize"}
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
# Any fixed 64-bit key works: every kdpipe worker takes the same lock around schema and study creation.
SCHEMA_LOCK_KEY = 0x6B64706970650001


# --- the search space -----------------------------------------------------------------------


@dataclass
class Choice:
    """What one trial trains with."""

    method: str
    params: dict[str, Any]  # the method's full parameters
    optimizer: dict[str, Any]  # the distill.optimizer keys the search sets


@dataclass
class SearchSpace:
    methods: list[str]  # candidate methods; the pipeline's own method alone when the method is not searched
    method_searched: bool
    dims: dict[str, dict[str, dict[str, Any]]]  # method -> parameter -> {low, high, log} | {choices}
    base: dict[str, dict[str, Any]]  # method -> its parameters outside the search
    optimizer: dict[str, dict[str, Any]]  # distill.optimizer key -> range, shared by every method

    def key(self, method: str, param: str) -> str:
        """Optuna's parameter name: prefixed by the method when the method is searched, so each keeps its own space."""
        return f"{method}.{param}" if self.method_searched else param

    def suggest(self, trial) -> Choice:
        method = trial.suggest_categorical("method", self.methods) if self.method_searched else self.methods[0]
        fields = get_method(method).Params.model_fields
        values = dict(self.base[method])
        conditions = active_conditions(get_method(method).Params)
        # Unconditional parameters first: a conditional one is drawn only where its condition holds.
        for name in sorted(self.dims[method], key=lambda n: n in conditions):
            if all(values[other] in allowed for other, allowed in conditions.get(name, {}).items()):
                values[name] = _draw(trial, self.key(method, name), self.dims[method][name],
                                     fields[name].annotation is int)
        optimizer = {name: _draw(trial, OPTIMIZER + name, spec, False) for name, spec in self.optimizer.items()}
        return Choice(method, values, optimizer)

    def decode(self, flat: dict[str, Any]) -> Choice:
        """What a trial trained with, from its Optuna parameters."""
        method = flat.get("method", self.methods[0])
        values = dict(self.base[method])
        values.update({name: flat[self.key(method, name)] for name in self.dims[method] if self.key(method, name) in flat})
        return Choice(method, values, {name: flat[OPTIMIZER + name] for name in self.optimizer if OPTIMIZER + name in flat})

    def grid(self) -> dict[str, list]:
        grid = {self.key(m, p): spec["choices"] for m, dims in self.dims.items() for p, spec in dims.items()}
        return grid | {OPTIMIZER + name: spec["choices"] for name, spec in self.optimizer.items()}


def _draw(trial, key: str, spec: dict[str, Any], integer: bool) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    if integer:
        return trial.suggest_int(key, math.ceil(spec["low"]), math.floor(spec["high"]), log=spec["log"])
    return trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])


def resolve_space(pipeline: Pipeline) -> SearchSpace:
    """The campaign's search space, checked against the method registry; raises InputError naming the key."""
    search = pipeline.search
    own = pipeline.distill.method
    entries = {} if search.space == "auto" else {k: _parse_spec(v, f"search.space.{k}") for k, v in search.space.items()}
    method_spec = entries.pop("method", None)
    if method_spec is None:
        methods = [own]
    else:
        methods = _candidate_methods(method_spec, pipeline)
    known = registry()
    blocks = {name: entries.pop(name) for name in list(entries) if name in known}
    optimizer_base = pipeline.distill.optimizer.model_dump(mode="json")
    optimizer = {name[len(OPTIMIZER):]: _resolve_spec(OptimizerConfig, None, "distill.optimizer", name[len(OPTIMIZER):],
                                                      entries.pop(name), f"search.space.{name}", optimizer_base)
                 for name in list(entries) if name.startswith(OPTIMIZER)}
    for name in blocks:
        if name not in methods:
            raise InputError(f"search.space.{name}", f"method '{name}' is not searched (candidates: {', '.join(methods)})")

    dims: dict[str, dict[str, dict[str, Any]]] = {}
    base: dict[str, dict[str, Any]] = {}
    for m in methods:
        params_cls = get_method(m).Params
        base[m] = pipeline.distill.params.model_dump(mode="json") if m == own else params_cls().model_dump(mode="json")
        if search.space == "auto":
            specs = {p: ("auto", f"search.space.{p}") for p in search_space(params_cls)}
        else:
            specs = {p: (s, f"search.space.{p}") for p, s in entries.items() if p in params_cls.model_fields}
        block = blocks.get(m)
        if block == "auto":
            specs.update({p: ("auto", f"search.space.{m}") for p in search_space(params_cls)})
        elif block is not None:
            if not isinstance(block, dict):
                raise InputError(f"search.space.{m}", "expected auto or a mapping of the method's parameters to ranges")
            for p, s in block.items():
                s = _parse_spec(s, f"search.space.{m}.{p}")
                if p not in params_cls.model_fields:
                    fields = list(params_cls.model_fields)
                    raise InputError(f"search.space.{m}.{p}", f"method '{m}' has no parameter '{p}'{_suggest(p, fields)}; "
                                                              f"its parameters: {', '.join(fields) or 'none'}")
                specs[p] = (s, f"search.space.{m}.{p}")
        dims[m] = {p: _resolve_spec(params_cls, search_space(params_cls).get(p), f"method '{m}'", p, s, key, base[m])
                   for p, (s, key) in specs.items()}

    for p, s in entries.items():
        if not any(p in get_method(m).Params.model_fields for m in methods):
            names = sorted({f for m in methods for f in get_method(m).Params.model_fields} | set(known) | {"method"}
                           | {OPTIMIZER + f for f in OptimizerConfig.model_fields})
            raise InputError(f"search.space.{p}", f"no candidate method ({', '.join(methods)}) has a parameter '{p}'"
                                                  f"{_suggest(p, names)}; valid keys: {', '.join(names)}")
    space = SearchSpace(methods, method_spec is not None, dims, base, optimizer)
    if not space.method_searched and not dims[own] and not optimizer:
        raise InputError("search.space", f"nothing to search: method '{own}' declares no search ranges; "
                                         "name parameters with {low, high} or {choices}, or search `method`")
    if search.sampler == "grid":
        if space.method_searched:
            raise InputError("search.sampler", "the grid sampler cannot search `method` (each method has its own "
                                               "parameters); use tpe or random")
        for p, spec in {**dims[own], **{OPTIMIZER + k: v for k, v in optimizer.items()}}.items():
            if "choices" not in spec:
                raise InputError(f"search.space.{p}", "the grid sampler needs {choices: [...]} for every parameter")
    return space


def _parse_spec(value: Any, key: str) -> Any:
    """auto, a RangeSpec, a ChoicesSpec, or (a mapping of neither) a method's block, parsed later."""
    if value == "auto":
        return value
    if not isinstance(value, dict):
        raise InputError(key, f"expected {{low, high, log}}, {{choices: [...]}} or auto, got {value!r}")
    model = ChoicesSpec if "choices" in value else RangeSpec if {"low", "high", "log"} & set(value) else None
    if model is None:
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _input_error(exc, model, tuple(key.split("."))) from None


def _candidate_methods(spec: Any, pipeline: Pipeline) -> list[str]:
    if not isinstance(spec, ChoicesSpec):
        raise InputError("search.space.method", "expected {choices: [method, ...]}")
    known = registry()
    methods = list(dict.fromkeys(spec.choices))
    for m in methods:
        if m not in known:
            raise InputError("search.space.method", f"unknown method '{m}'{_suggest(str(m), known)}; "
                                                    f"expected some of {', '.join(sorted(known))}")
        try:
            known[m].check_pipeline(pipeline)
        except InputError as exc:
            raise InputError("search.space.method", f"method '{m}' cannot run this pipeline: {exc.message}") from None
    return methods


def _resolve_spec(model: type, declared: dict[str, Any] | None, owner: str, param: str, spec: Any, key: str,
                  base: dict[str, Any]) -> dict[str, Any]:
    """One parameter's range, each bound or choice validated by `model` (the method's Params, or OptimizerConfig)."""
    if param not in model.model_fields:
        fields = list(model.model_fields)
        raise InputError(key, f"{owner} has no parameter '{param}'{_suggest(param, fields)}; its parameters: {', '.join(fields)}")
    if spec == "auto":
        if declared is None:
            raise InputError(key, f"{owner} declares no search range for '{param}'; give {{low, high}} or {{choices}}")
        return declared
    if isinstance(spec, RangeSpec):
        resolved, values = {"low": spec.low, "high": spec.high, "log": spec.log}, [spec.low, spec.high]
    elif isinstance(spec, ChoicesSpec):
        resolved, values = {"choices": list(spec.choices)}, list(spec.choices)
    else:
        raise InputError(key, "expected {low, high, log}, {choices: [...]} or auto")
    for value in values:
        try:
            model.model_validate({**base, param: value})
        except ValidationError as exc:
            raise InputError(key, f"{value!r} is not a valid {param} for {owner}: {exc.errors()[0]['msg']}") from None
    return resolved


# --- storage ----------------------------------------------------------------------------------


def is_rdb_url(storage: str) -> bool:
    return storage.split(":", 1)[0].split("+", 1)[0] in RDB_SCHEMES and "://" in storage


def sqlalchemy_url(storage: str) -> str:
    """psycopg (v3) is the PostgreSQL driver kdpipe supports; SQLAlchemy's plain postgresql:// means psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if storage.startswith(prefix):
            return "postgresql+psycopg://" + storage[len(prefix):]
    return storage


def describe_storage(storage: str) -> str:
    """The storage as the report may show it: an RDB URL without its password."""
    if not is_rdb_url(storage):
        return str(Path(storage).resolve())
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


@contextlib.contextmanager
def schema_lock(url: str):
    """Serialize schema and study creation across workers starting at the same instant.

    Two processes creating Optuna's tables on an empty PostgreSQL database at
    once collide on a duplicate enum type, so PostgreSQL workers take an
    advisory lock; sqlite workers on one machine take a file lock.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
        finally:
            engine.dispose()
    elif parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        with open(f"{parsed.database}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:
        yield


def open_study(storage: str, study_name: str, directions: list[str], *, sampler=None, pruner=None,
               heartbeat_seconds: int = 30):
    """Create the study or join it; safe when many workers start together."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if is_rdb_url(storage):
            url = sqlalchemy_url(storage)
            try:
                with schema_lock(url):
                    backend = RDBStorage(url, heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
                    study = optuna.create_study(storage=backend, study_name=study_name, directions=directions,
                                                sampler=sampler, pruner=pruner, load_if_exists=True)
            except ImportError as exc:
                raise InputError("search.storage", f"no database driver for '{describe_storage(storage)}' ({exc}); "
                                                   "for PostgreSQL: pip install 'kdpipe[postgres]'") from None
        else:
            path = Path(storage)
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalStorage(JournalFileBackend(str(path)))
            study = optuna.create_study(storage=backend, study_name=study_name, directions=directions,
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise InputError("search.objective", f"study '{study_name}' exists with directions {found}, this objective "
                                             f"needs {directions}; pick another study name")
    return study


def make_sampler(name: str, space: SearchSpace, seed: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    return optuna.pruners.NopPruner()


# --- trials ---------------------------------------------------------------------------------


class TrialRuns:
    """Each trial as an MLflow run nested under the campaign's run (explicit run ids: no fluent active-run juggling)."""

    def __init__(self, mlflow, parent_run_id: str):
        from mlflow.entities import Metric, Param, RunTag

        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        self.client = mlflow.MlflowClient()
        self.parent_run_id = parent_run_id
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_run_id, **tags})
        self.client.log_batch(run.info.run_id, params=[self.Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[self.Metric(k, float(v), now, step) for k, v in metrics.items()])

    def end(self, run_id: str, state: str, error: str | None = None) -> None:
        tags = [self.RunTag("kdpipe.trial_state", state)] + ([self.RunTag("kdpipe.error", error[:5000])] if error else [])
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED"))


@dataclass
class Campaign:
    """One worker's share of a study: the trials it runs and what it needs to run them."""

    pipeline: Pipeline
    space: SearchSpace
    data: Any  # kdpipe.data.Splits, on the device
    teacher: nn.Module | None
    initial_student: nn.Module  # untrained: every trial starts from these weights
    teacher_cache: TeacherOutputCache  # one instance for every trial: the teacher's outputs are computed once
    trainer_options: dict[str, Any]  # further Trainer keywords (precision, compile)
    runs: TrialRuns
    work_dir: Path  # trial checkpoints and ONNX files
    log: Any = print

    def __post_init__(self):
        self.objective_names = self.pipeline.search.objective
        self.best_accuracy, self.best_trial = -1.0, None
        self.host = socket.gethostname()
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, trial) -> float | tuple[float, ...]:
        import optuna

        choice = self.space.suggest(trial)
        method_cls = get_method(choice.method)
        trial.set_user_attr("worker", f"{self.host}:{os.getpid()}")
        run_id = self.runs.start(f"trial-{trial.number}",
                                 {"method": choice.method, **choice.params,
                                  **{OPTIMIZER + k: v for k, v in choice.optimizer.items()}},
                                 {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number)})
        try:
            params = method_cls.Params.model_validate(choice.params)
            student = copy.deepcopy(self.initial_student)
            method = method_cls(params, student=student, teacher=self.teacher, num_classes=self.data.num_classes,
                                input_shape=self.data.input_shape, taps=self.pipeline.distill.taps)
            cfg = self.pipeline.distill
            trainer = Trainer(self.data, epochs=cfg.epochs, batch_size=self.pipeline.data.batch_size,
                              optimizer=cfg.optimizer.model_copy(update=choice.optimizer), seed=self.pipeline.seed, teacher_cache=self.teacher_cache,
                              on_epoch=self._epoch_reporter(trial, run_id), **self.trainer_options)
            torch.manual_seed(self.pipeline.seed + 1)
            student = method.fit(trainer).eval()
            val_acc = accuracy(student, self.data.x_val, self.data.y_val)
            results = {"val_accuracy": val_acc}
            if "latency_p50" in self.objective_names:
                results["latency_p50"] = self._latency_p50(student, trial.number)
            self.runs.log_metrics(run_id, {f"final/{k}": v for k, v in results.items()})
            self._keep_if_best(trial, student, method.extra_modules(), val_acc)
        except optuna.TrialPruned:
            self.runs.end(run_id, "pruned")
            raise
        except Exception as exc:
            self.runs.end(run_id, "failed", f"{type(exc).__name__}: {exc}")
            raise
        self.runs.end(run_id, "complete")
        values_out = tuple(results[name] for name in self.objective_names)
        return values_out[0] if len(values_out) == 1 else values_out

    def _epoch_reporter(self, trial, run_id: str):
        import optuna

        step = 0
        can_prune = len(self.objective_names) == 1

        def on_epoch(label: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
            # One running step across every fit a method makes (hint stage, generations), so steps never repeat.
            nonlocal step
            step += 1
            self.runs.log_metrics(run_id, {f"{label}/{k}": v for k, v in metrics.items()}, step=step)
            if can_prune and "val_accuracy" in metrics:  # a phase without validation (FitNets' hints) has none
                trial.report(metrics["val_accuracy"], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at {label} epoch {epoch}")

        return on_epoch

    def _latency_p50(self, student: nn.Module, number: int) -> float:
        from kdpipe.onnx_runtime import available_providers, session
        from kdpipe.stages.export import export_onnx
        from kdpipe.stages.validate import measure_latency

        cfg = self.pipeline.validation
        path = self.work_dir / f"trial-{number}.onnx"
        x_val = self.data.x_val.cpu()
        try:
            export_onnx(copy.deepcopy(student).cpu(), x_val[:2], path, self.pipeline.export.opset, True)
            providers, _ = available_providers(cfg.providers)
            sess = session(path, providers, cfg.threads)
            return measure_latency(sess, x_val.numpy(), min(cfg.batch_sizes), cfg.warmup, cfg.runs)["p50"]
        finally:
            path.unlink(missing_ok=True)

    def _keep_if_best(self, trial, student: nn.Module, extra: nn.Module | None, val_acc: float) -> None:
        """Keep this worker's most accurate student on disk (as distill saves it), so distill can reuse it."""
        if val_acc <= self.best_accuracy:
            return
        path = self.work_dir / f"trial-{trial.number}-student.pt"
        torch.save({"student": student.state_dict(), **({"extra": extra.state_dict()} if extra else {})}, path)
        if self.best_trial is not None:
            (self.work_dir / f"trial-{self.best_trial}-student.pt").unlink(missing_ok=True)
        self.best_accuracy, self.best_trial = val_acc, trial.number
        trial.set_user_attr("checkpoint", f"{self.host}:{path.resolve()}")

    def local_checkpoint(self, trial) -> Path | None:
        """The trial's student checkpoint when this machine holds it."""
        host, _, path = str(trial.user_attrs.get("checkpoint", "")).partition(":")
        return Path(path) if host == self.host and path and Path(path).is_file() else None

    def trial_line(self, study, trial) -> None:
        value = "" if trial.values is None else "  " + "  ".join(
            f"{n} {v:.4f}" for n, v in zip(self.objective_names, trial.values))
        shown = "  ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        self.log(f"  trial {trial.number} {trial.state.name.lower()}{value}  {shown}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_trial(study, objective_names: list[str]):
    """The single best trial; for a Pareto search, the front's most accurate trial. None before any trial completes."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    candidates = study.best_trials if len(objective_names) > 1 else [study.best_trial]
    acc = objective_names.index("val_accuracy")
    return max(candidates, key=lambda t: t.values[acc])


def summarize(study, storage: str, objective_names: list[str]) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.trials
    best = best_trial(study, objective_names)
    count = lambda state: sum(t.state == state for t in trials)  # noqa: E731
    summary = {
        "study": study.study_name,
        "storage": describe_storage(storage),
        "objective": objective_names,
        "n_trials": len(trials),
        "n_complete": count(TrialState.COMPLETE),
        "n_pruned": count(TrialState.PRUNED),
        "n_failed": count(TrialState.FAIL),
        "best_trial": best.number if best else None,
        "best_params": best.params if best else None,
        "best_value": (best.values[0] if len(objective_names) == 1 else dict(zip(objective_names, best.values))) if best else None,
    }
    if len(objective_names) > 1:
        summary["pareto_front"] = [{"trial": t.number, "values": dict(zip(objective_names, t.values)), "params": t.params}
                                   for t in study.best_trials]
    return summary


def save_plots(study, objective_names: list[str], directory: Path) -> tuple[list[Path], list[str]]:
    """Optimization history, parameter importances and (multi-objective) the Pareto front as PNG files.

    Returns the files written and, for each plot that could not be drawn (too few
    complete trials, say), why.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    directory.mkdir(parents=True, exist_ok=True)
    acc = objective_names.index("val_accuracy")
    multi = len(objective_names) > 1
    target = (lambda t: t.values[acc]) if multi else None
    plots = {
        "optimization_history": lambda: vis.plot_optimization_history(study, target=target, target_name="val_accuracy"),
        "param_importances": lambda: vis.plot_param_importances(study, target=target, target_name="val_accuracy"),
    }
    if multi:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=objective_names)
    written, skipped = [], []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            path = directory / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            skipped.append(f"{name}: {exc}")
    return written, skipped
