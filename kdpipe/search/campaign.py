"""One worker's campaign: the trials it trains, their nested MLflow runs, the sampler and pruner, and the summary.

A campaign trains one student per trial with the parameters Optuna suggests,
reusing one teacher-output cache across trials (the teacher is frozen), and
records every trial as a nested MLflow run under the campaign's run.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.methods import get_method
from kdpipe.search.space import EXPORT, OPTIMIZER, SearchSpace, with_export
from kdpipe.search.storage import describe_storage
from kdpipe.tracking import RunWriter
from kdpipe.inference import accuracy
from kdpipe.train import Trainer, TrainerSettings, save_method

DIRECTIONS = {"val_accuracy": "maximize", "latency_p50": "minimize"}
# A trial's MLflow run status by how the trial ended (killed: its worker died; a resumed run closes it).
RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "killed": "KILLED"}


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


class TrialRuns:
    """Each trial as an MLflow run nested under the campaign's run, written by run id (kdpipe.tracking.RunWriter)
    through `client`, bound to the campaign's store."""

    def __init__(self, client, parent_run_id: str):
        self.runs = RunWriter(client)
        self.client = client
        self.parent_run_id = parent_run_id
        self.experiment_id = client.get_run(parent_run_id).info.experiment_id

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run_id = self.runs.create(self.experiment_id, name, {"mlflow.parentRunId": self.parent_run_id, **tags})
        self.runs.log_params(run_id, params)
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.runs.log_metrics(run_id, metrics, step)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.runs.set_tags(run_id, tags)

    def end(self, run_id: str, state: str, error: str | None = None) -> None:
        self.runs.set_tags(run_id, {"kdpipe.trial_state": state, **({"kdpipe.error": error[:5000]} if error else {})})
        self.runs.end(run_id, RUN_STATUS.get(state, "FAILED"))

    def record_killed(self, study, numbers: list[int], reason: str) -> list[int]:
        """Give each killed trial that has no MLflow run yet (its worker died before creating one) a KILLED run,
        so every trial of the study keeps its nested run; returns the trial numbers recorded."""
        logged = {run.data.tags.get("optuna.trial") for run in self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'", max_results=50000)}
        missing = [n for n in numbers if str(n) not in logged]
        for number in missing:
            run_id = self.start(f"trial-{number}", study.trials[number].params,
                                {"optuna.study": study.study_name, "optuna.trial": str(number)})
            self.end(run_id, "killed", reason)
        return missing

    def close_running(self, reason: str) -> list[str]:
        """End the trial runs still RUNNING under the campaign's run (their worker died); returns their run ids."""
        running = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                                                                "and attributes.status = 'RUNNING'")
        for run in running:
            self.end(run.info.run_id, "killed", reason)
        return [run.info.run_id for run in running]


@dataclass
class Campaign:
    """One worker's share of a study: the trials it runs and what it needs to run them."""

    pipeline: Any  # kdpipe.pipeline.Pipeline
    space: SearchSpace
    data: Any  # kdpipe.data.Splits, on the device
    teacher: nn.Module | None
    initial_student: nn.Module  # untrained: every trial starts from these weights
    # Its teacher_cache is one instance for every trial: the teacher's outputs are computed once.
    settings: TrainerSettings
    runs: TrialRuns
    work_dir: Path  # trial checkpoints and ONNX files
    run_dir: Path  # the run directory this worker belongs to: a resumed run fails the trials it left running
    log: Any = print

    def __post_init__(self):
        self.objective_names = self.pipeline.search.objective
        self.best_accuracy, self.best_trial = -1.0, None
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{self.run_dir}"  # marks the trials this run started, for fail_orphans
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.calibration: dict[str, list] = {}  # static and QAT calibration batches by the input they are drawn as

    def __call__(self, trial) -> float | tuple[float, ...]:
        import optuna

        choice = self.space.suggest(trial)
        method_cls = get_method(choice.method)
        trial.set_user_attr("worker", f"{self.host}:{os.getpid()}")
        trial.set_user_attr("run_dir", self.owner)
        run_id = self.runs.start(f"trial-{trial.number}",
                                 {"method": choice.method, **choice.params,
                                  **{OPTIMIZER + k: v for k, v in choice.optimizer.items()},
                                  **{EXPORT + k: v for k, v in choice.export.items()}},
                                 {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number)})
        try:
            params = method_cls.Params.model_validate(choice.params)
            student = copy.deepcopy(self.initial_student)
            torch.manual_seed(self.pipeline.training_seed + 1)  # the method's own modules, then training, from the seed
            method = method_cls(params, student=student, teacher=self.teacher, num_classes=self.data.num_classes,
                                input_shape=self.data.input_shape, taps=self.pipeline.distill.taps,
                                seed=self.pipeline.training_seed)
            cfg = self.pipeline.distill
            on_epoch = self._epoch_reporter(trial, run_id)
            trainer = Trainer(self.data, epochs=cfg.epochs, batch_size=self.pipeline.data.batch_size,
                              optimizer=cfg.optimizer.model_copy(update=choice.optimizer), seed=self.pipeline.training_seed,
                              on_epoch=on_epoch, settings=self.settings)
            student = method.fit(trainer).eval()
            # With export keys in the space, the trial scores the model its quantization ships (space.with_export).
            quantized = None
            if self.space.export:
                pipeline = with_export(self.pipeline.with_method(choice.method, choice.params, choice.optimizer),
                                       choice.export)
                self.runs.set_tags(run_id, {"kdpipe.quantization": pipeline.export.quantize})
                quantized = pipeline if pipeline.export.quantize != "none" else None
            results = self._score(quantized, student, trial.number, on_epoch, run_id)
            self.runs.log_metrics(run_id, {f"final/{k}": v for k, v in results.items()})
            self._keep_if_best(trial, method, results["val_accuracy"])
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

    def _score(self, quantized, student: nn.Module, number: int, on_epoch, run_id: str) -> dict[str, float]:
        """The trial's objective values, of the FP32 student or, given `quantized` (the trial's pipeline, whose
        export.quantize is not none), of its INT8 model: static/dynamic onnxruntime PTQ of the student's ONNX, or
        the student fine-tuned fake-quantized (kdpipe.qat, one more phase of the loop) exported as QDQ. The graph is
        built and measured on the validation split by kdpipe.deploy, as the run's export and validate stages do:
        the same `export.input`, calibration, session settings and timing."""
        from kdpipe.deploy import build_ptq, export_qat_graph, export_student_graph, inputs_for, measure_model
        from kdpipe.onnx_export import takes_uint8
        from kdpipe.qat import fine_tune

        results = {"val_accuracy": accuracy(student, self.data.x_val, self.data.y_val)}
        if quantized is None and "latency_p50" not in self.objective_names:
            return results
        cfg = self.pipeline.validation
        export_cfg = (quantized or self.pipeline).export
        graph_input = export_cfg.input
        fp32 = self.work_dir / f"trial-{number}.onnx"
        mode = "none" if quantized is None else export_cfg.quantize
        delivered = fp32 if quantized is None else self.work_dir / f"trial-{number}.{mode}.onnx"
        try:
            if mode == "qat":
                fake_quantized, _ = fine_tune(quantized, student, self.teacher, self.data, self._calibration("float"),
                                              self.settings, on_epoch)
                export_qat_graph(fake_quantized, self.data, export_cfg, delivered, graph_input)
            else:
                export_student_graph(copy.deepcopy(student), self.data, export_cfg, fp32, graph_input)
                if mode != "none":
                    build_ptq(fp32, delivered, mode, self._calibration(graph_input) if mode == "static" else None,
                              export_cfg)
            timed = [min(cfg.batch_sizes)] if "latency_p50" in self.objective_names else []
            measured = measure_model(delivered, cfg, inputs_for(delivered, self.data, "val"),
                                     self.data.y_val.cpu().numpy(), timed)
            # What was measured, read from the graph and the session themselves.
            self.runs.set_tags(run_id, {"kdpipe.graph_input": "uint8" if takes_uint8(delivered) else "float",
                                        "kdpipe.session": json.dumps(measured["session"], sort_keys=True)})
            if mode != "none":
                results = {"val_accuracy": measured["accuracy"], "val_accuracy_fp32": results["val_accuracy"]}
            if timed:
                results["latency_p50"] = measured["latency_ms"][timed[0]]["p50"]
            return results
        finally:
            fp32.unlink(missing_ok=True)
            delivered.unlink(missing_ok=True)

    def _calibration(self, graph_input: str) -> list:
        """Calibration batches as `graph_input` takes them, drawn once for every trial that needs them."""
        from kdpipe.deploy import calibration_batches

        if graph_input not in self.calibration:
            self.calibration[graph_input] = calibration_batches(self.data, self.pipeline.export,
                                                                self.pipeline.data.batch_size, self.pipeline.seed,
                                                                graph_input)
        return self.calibration[graph_input]

    def _keep_if_best(self, trial, method: nn.Module, val_acc: float) -> None:
        """Keep this worker's most accurate trained method on disk (as distill saves it), so distill can reuse it."""
        if val_acc <= self.best_accuracy:
            return
        path = self.work_dir / f"trial-{trial.number}-student.pt"
        save_method(method, path)
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


def fail_orphans(study, owner: str | None) -> list[int]:
    """Fail the trials a killed earlier process of this run left RUNNING; returns their numbers.

    `owner`: the run's `run_dir` trial attribute on a shared study, whose other workers' running trials are alive
    (or, on an RDB storage, failed by Optuna's heartbeat check once their worker stops beating); None for the
    run's private study, where every running trial is the run's own.
    """
    from optuna.trial import TrialState

    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if owner is None or t.user_attrs.get("run_dir") == owner]
    for number in orphans:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return orphans


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
