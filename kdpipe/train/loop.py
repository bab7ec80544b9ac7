"""The Trainer: runs a method's phases epoch by epoch, every update of every batch, on one `Splits`."""

from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import distributed, gc_tuning
from kdpipe.errors import InputError
from kdpipe.inference import predict
from kdpipe.train.checkpoints import PhaseCheckpoint
from kdpipe.train.ema import ModelEMA
from kdpipe.train.metering import EpochMeter, TimingLog
from kdpipe.train.optim import UpdateState, make_optimizer
from kdpipe.train.serving import TeacherServing
from kdpipe.train.settings import AUTOCAST_DTYPES, TrainerSettings, resolve_precision
from kdpipe.train.steps import Batch, EpochCallback, Phase, TeacherFn, Update, prefetched, unique


class Trainer:
    """Runs phases with one optimizer setting for `epochs` epochs of `batch_size`; reports each epoch to
    `on_epoch`. `settings` says how (kdpipe.train.settings.TrainerSettings)."""

    def __init__(self, data, *, epochs: int, batch_size: int, optimizer, seed: int,
                 on_epoch: EpochCallback | None = None, settings: TrainerSettings | None = None):
        self.data, self.epochs, self.batch_size, self.optimizer, self.seed = data, epochs, batch_size, optimizer, seed
        self.on_epoch = on_epoch or (lambda label, epoch, epochs, metrics: None)
        self.final_metrics: dict[str, float] = {}  # what run() returned last (the distill stage reports it)
        self.settings = settings = settings or TrainerSettings()
        self.device = data.y_train.device
        self.precision = resolve_precision(settings.precision, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.compile_model = settings.compile
        self.dist = distributed.current()
        self.channels_last = self.device.type == "cuda" and len(data.input_shape) == 3
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels once
        self.serving = TeacherServing(data, settings, seed, batch_size, self.autocast_dtype, self.channels_last)
        self.timing = TimingLog()
        self._compiled: set[int] = set()

    @property
    def teacher_cache(self):
        return self.serving.cache

    @property
    def teacher_modes(self) -> list[dict[str, Any]]:
        """How each teacher() call serves the teacher, and why."""
        return self.serving.modes

    @property
    def views(self):
        return self.serving.views

    @property
    def epoch_log(self) -> list[dict[str, Any]]:
        return self.timing.epochs

    @property
    def optimizer_steps(self) -> int:
        return self.timing.optimizer_steps

    def timing_summary(self) -> dict[str, float] | None:
        return self.timing.summary()

    @property
    def static_batches(self) -> bool:
        """compile: true trains on batches of one shape, which CUDA graphs need (and torch.compile would recompile
        for): each epoch's last partial batch is dropped."""
        return self.compile_model

    @property
    def cuda_graphs(self) -> bool:
        return self.compile_model and self.device.type == "cuda"

    @property
    def full_batches(self) -> int:
        """Batches of the full size in an epoch; a split smaller than one batch is one batch of its own size."""
        return max(1, len(self.data.y_train) // self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch: one per grad_accum_steps batches, and one for the rest of the epoch's."""
        batches = self.full_batches if self.static_batches else math.ceil(len(self.data.y_train) / self.batch_size)
        return math.ceil(batches / self.settings.grad_accum_steps)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def batches(self, generator: torch.Generator, two_views: bool = False) -> Iterator[Batch]:
        """The epoch's batches; `two_views`: each with the strong view of its images too (Batch.x_strong)."""
        ranks = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        views = self.serving.views
        if two_views:
            source = ((index, None, x, strong, y) for index, x, strong, y
                      in self.data.two_view_batches(self.batch_size, generator, **ranks))
        elif views is not None:
            source = ((index, view, x, None, y) for index, view, x, y
                      in self.data.view_batches(self.batch_size, generator, views.params, views.views, **ranks))
        else:
            source = ((index, None, x, None, y)
                      for index, x, y in self.data.train_batches(self.batch_size, generator, **ranks))
        for index, view, x, strong, y in source:
            x, strong = (self._memory_format(t) for t in (x, strong))
            yield Batch(index, x, y, view, strong)

    def _memory_format(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is not None and self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def step_batches(self, generator: torch.Generator, two_views: bool = False) -> Iterator[Batch]:
        """The epoch's batches as the steps take them: all of one shape under compile: true (the partial batch, the
        last one, is never drawn), and on CUDA each prepared while the step before it runs."""
        batches = self.batches(generator, two_views)
        if self.static_batches:
            batches = itertools.islice(batches, self.full_batches)
        return prefetched(batches, self.device)

    def teacher(self, teacher: nn.Module, taps: list[str], cacheable: bool = True,
                soft_labels: bool = False, two_views: bool = False) -> TeacherFn:
        """The frozen teacher's outputs for a batch, served as kdpipe.train.serving decides."""
        self._prepare(teacher)
        return self.serving.serve(teacher, taps, cacheable, soft_labels, two_views)

    def _prepare(self, module: nn.Module) -> None:
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

    def _compile(self, module: nn.Module) -> None:
        """In place, so the method's own references to the module run compiled too. On CUDA in torch's
        reduce-overhead mode: the compiled forward and backward are captured once per shape as CUDA graphs
        (cudagraph trees) and replayed, one launch instead of one per kernel. On CPU the default mode."""
        if id(module) in self._compiled:
            return
        self._compiled.add(id(module))
        if self.cuda_graphs:
            module.compile(mode="reduce-overhead")
        else:
            module.compile()

    def val_accuracy(self, model: nn.Module) -> float:
        """Validation accuracy, each rank scoring its share of the validation split."""
        ranks, rank = self.dist.world_size, self.dist.rank
        x, y = self.data.x_val[rank::ranks], self.data.y_val[rank::ranks]
        with self.autocast():
            correct = (predict(model, x).logits.argmax(1) == y).sum()
        counts = distributed.all_reduce_sum(torch.stack([correct.double(), torch.tensor(len(y), dtype=torch.float64,
                                                                                         device=correct.device)]))
        return (counts[0] / counts[1]).item()

    def static_batch_summary(self) -> dict[str, Any] | None:
        """Under compile: true, the batch size trained on and the training samples each epoch leaves out."""
        if not self.static_batches:
            return None
        samples = len(self.data.y_train)
        return {"batch_size": self.batch_size, "last_partial_batch": "dropped",
                "dropped_per_epoch": samples - min(samples, self.full_batches * self.batch_size)}

    # --- phases ---------------------------------------------------------------------------------------------

    def run(self, phases: Iterable[Phase]) -> dict[str, float]:
        """Run each phase in order (a generator may build the next phase from the previous one's result).

        Returns the last phase's final metrics, with `best_val_accuracy` of its first evaluated model.
        """
        if "torch._dynamo" not in sys.modules:  # what torch.optim's first step imports: long-lived
            with gc_tuning.imports_uncollected():
                importlib.import_module("torch._dynamo")
        result: dict[str, float] = {}
        for number, phase in enumerate(phases):
            result = self._run_phase(number, phase)
        self.final_metrics = result
        return result

    def _run_phase(self, number: int, phase: Phase) -> dict[str, float]:
        modules = phase.modules()
        for module in modules:
            self._prepare(module)
            if self.compile_model:
                self._compile(module)
        updates = [self._update_state(update, phase.epochs) for update in phase.updates]
        decay = self.settings.ema_decay
        emas = {label: ModelEMA(model, decay) for label, model in phase.evaluate.items()} if decay else {}
        generator = torch.Generator().manual_seed(self.seed)
        state: dict[str, Any] = {"epoch": 0, "best": {}, "metrics": {}, "finished": False}
        checkpoint = self._checkpoint(number, phase)
        parts = (modules, updates, generator, list(emas.values()))
        if checkpoint is not None and checkpoint.exists():
            state = checkpoint.restore(*parts)
            if state["finished"]:
                return self._result(phase, state)
        for epoch in range(state["epoch"] + 1, phase.epochs + 1):
            if phase.before_epoch is not None:
                phase.before_epoch(epoch)
            state["metrics"] = self._epoch(phase, updates, modules, generator, epoch, emas)
            self._keep_best(phase, state, emas)
            state["epoch"] = epoch
            self._save(checkpoint, state, parts)
        for label, model in phase.evaluate.items():
            if label in state["best"]:
                model.load_state_dict(state["best"][label][1])
        state["finished"] = True
        self._save(checkpoint, state, parts)
        return self._result(phase, state)

    def _update_state(self, update: Update, epochs: int) -> UpdateState:
        params = update.params if update.params is not None else [p for m in update.modules for p in m.parameters()]
        params = [p for p in unique(params) if p.requires_grad]
        s = self.settings
        opt, schedule = make_optimizer(params, update.optimizer or self.optimizer, epochs, self.steps_per_epoch,
                                       warmup_steps=s.warmup_epochs * self.steps_per_epoch,
                                       warmup_start_factor=s.warmup_start_factor,
                                       filter_bias_and_bn=s.filter_bias_and_bn)
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        return UpdateState(update, opt, schedule, scaler, params)

    def _checkpoint(self, number: int, phase: Phase) -> PhaseCheckpoint | None:
        directory = self.settings.checkpoint_dir
        return PhaseCheckpoint(Path(directory) / f"{number}-{phase.name}.pt", self.device) if directory else None

    def _save(self, checkpoint: PhaseCheckpoint | None, state: dict[str, Any], parts) -> None:
        if checkpoint is not None and self.dist.is_main:
            checkpoint.save(state, *parts)

    def _keep_best(self, phase: Phase, state: dict[str, Any], emas: dict[str, ModelEMA]) -> None:
        """Each evaluated model's best epoch: its weights, or its EMA's when those are the ones exported."""
        for label, model in phase.evaluate.items():
            acc = state["metrics"][label]["val_accuracy"]
            if acc > state["best"].get(label, (-1.0, None))[0]:
                weights = emas[label].state_dict() if self.settings.ema_export and label in emas else model.state_dict()
                state["best"][label] = (acc, copy.deepcopy(weights))

    @staticmethod
    def _result(phase: Phase, state: dict[str, Any]) -> dict[str, float]:
        labels = list(phase.evaluate) or [u.name for u in phase.updates]
        result = dict(state["metrics"].get(labels[0], {}))
        if phase.evaluate:
            result["best_val_accuracy"] = state["best"].get(labels[0], (-1.0, None))[0]
        return result

    # --- one epoch ------------------------------------------------------------------------------------------

    def _epoch(self, phase: Phase, updates: list[UpdateState], modules: list[nn.Module], generator: torch.Generator,
               epoch: int, emas: dict[str, ModelEMA]) -> dict[str, dict[str, float]]:
        for module in modules:
            module.train()
        meter = EpochMeter(self.device)
        self._steps(updates, generator, meter, list(emas.values()), phase.two_views)
        for module in modules:
            distributed.broadcast_buffers(module)  # rank 0's BatchNorm statistics everywhere: one model to validate
        metrics, samples, steps, nonfinite, seconds = meter.totals()
        if steps == 0:
            raise InputError("data.batch_size", f"{phase.name} made no optimizer step: every training batch is smaller "
                             f"than 2 samples per process (BatchNorm cannot train on one); raise data.batch_size")
        if nonfinite:
            raise FloatingPointError(f"{phase.name} loss became non-finite in epoch {epoch}; lower the learning rate "
                                     "or set distill.clip_grad_norm")
        self.timing.optimizer_steps += meter.steps
        val_seconds = self._validate(phase, metrics, emas)
        first = next(iter(phase.evaluate)) if phase.evaluate else next(iter(metrics))
        timing = {"epoch_seconds": seconds, "samples_per_second": samples / seconds}
        if phase.evaluate:
            val_samples = len(self.data.y_val) * len(phase.evaluate)
            timing.update(val_seconds=val_seconds, val_samples_per_second=val_samples / max(val_seconds, 1e-9))
        metrics[first].update(timing)
        self.timing.epochs.append({"phase": phase.name, "epoch": epoch, "samples": samples, **timing})
        for label, values in metrics.items():
            self.on_epoch(label, epoch, phase.epochs, values)
        return metrics

    def _steps(self, updates: list[UpdateState], generator: torch.Generator, meter: EpochMeter,
               emas: list[ModelEMA], two_views: bool = False) -> None:
        """Every batch through every update; an optimizer step every grad_accum_steps batches (and for the epoch's
        rest). Accumulated losses are weighted by batch size and divided by the samples of the step, so that k
        batches of b make the step one batch of k·b would."""
        accumulate = self.settings.grad_accum_steps
        group = samples = 0
        for batch in self.step_batches(generator, two_views):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
            group, samples = group + 1, samples + len(batch.y)
            ends = group == accumulate
            shared: dict[str, Any] = {}
            for u in updates:
                with self.autocast():
                    loss, parts = u.update.loss(batch, shared)
                meter.add(u.update.name, loss, parts, len(batch.y))
                u.backward(loss, len(batch.y) if accumulate > 1 else 1, first=group == 1)
                if ends:
                    self._step(u, samples if accumulate > 1 else 1)
            meter.samples += len(batch.y)
            if ends:
                self._stepped(meter, emas)
                group = samples = 0
        if group:
            for u in updates:
                self._step(u, samples)
            self._stepped(meter, emas)

    def _step(self, u: UpdateState, divide: float) -> None:
        u.step(self._average_gradients, divide, self.settings.clip_grad_norm)

    @staticmethod
    def _stepped(meter: EpochMeter, emas: list[ModelEMA]) -> None:
        meter.steps += 1
        for ema in emas:
            ema.update()

    def _validate(self, phase: Phase, metrics: dict[str, dict[str, float]], emas: dict[str, ModelEMA]) -> float:
        """Score each evaluated model (`val_accuracy`) and its EMA; with ema_export the EMA's score is the one
        that picks the best epoch, the model's own is reported beside it. Returns the seconds it took."""
        start = time.perf_counter()
        for label, model in phase.evaluate.items():
            scores = {"val_accuracy": self.val_accuracy(model)}
            if label in emas:
                with emas[label].applied():
                    scores["val_accuracy_ema"] = self.val_accuracy(model)
                if self.settings.ema_export:
                    scores = {"val_accuracy": scores["val_accuracy_ema"], "val_accuracy_raw": scores["val_accuracy"]}
            metrics.setdefault(label, {}).update(scores)
        return time.perf_counter() - start

    def _average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average this update's gradients over the processes (every rank runs the same graph)."""
        if not self.dist.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / self.dist.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
