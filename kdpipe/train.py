"""The one training loop: every method, every phase, every update runs here.

A method describes its training as phases (FitNets: hint then KD; Born-Again: one per generation), each a
number of epochs in which every batch takes the phase's updates in order (adversarial: discriminator then
student; DML: peer by peer). An update names the modules it trains, its loss and its optimizer settings.
Autocast, the fp16 gradient scaler, gradient averaging across processes, per-epoch checkpoints and resume,
the teacher-output cache, metrics, timings and progress live here and nowhere else.

Under torchrun every rank draws the same permutation and takes its share of each batch (`data.batch_size`
stays the global batch); each update's gradients are averaged over ranks before its optimizer steps, and
the epoch metrics are summed over ranks. Finiteness is checked once per epoch, from a flag kept on the
device, so a step never waits for the host. On CUDA the next batch is prepared on a side stream while the
current step runs, and `compile: true` replays each compiled forward and backward as a CUDA graph, on batches of
one shape (the last partial batch of each epoch is dropped and the report says how many samples that leaves out).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import distributed
from kdpipe.atomic import save_torch
from kdpipe.errors import InputError
from kdpipe.inference import predict
from kdpipe.taps import Outputs
from kdpipe.teacher_cache import TeacherOutputCache, teacher_pass
from kdpipe.teacher_views import TeacherViews, teacher_views


@dataclass
class Batch:
    index: torch.Tensor  # positions in the training split, for cached teacher outputs
    x: torch.Tensor
    y: torch.Tensor
    view: torch.Tensor | None = None  # with teacher views: which recorded view of each image `x` is


# An update's loss: (batch, state shared by the updates of one step) -> (loss, named parts to report).
LossFn = Callable[[Batch, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EpochCallback = Callable[[str, int, int, dict[str, float]], None]  # label, epoch, epochs, metrics
TeacherFn = Callable[[Batch], Outputs]

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Update:
    """One optimizer step per batch: `loss` trains `modules` (or only `params` of them) with `optimizer`."""

    name: str  # metric label of its loss parts
    modules: list[nn.Module]
    loss: LossFn
    params: list[nn.Parameter] | None = None
    optimizer: Any = None  # an OptimizerConfig; None: the trainer's


@dataclass
class Phase:
    """`epochs` epochs of `updates`; `evaluate` names the models scored on validation each epoch, whose best
    epoch's weights are kept (none: the last epoch's weights stand)."""

    name: str
    updates: list[Update]
    epochs: int
    evaluate: dict[str, nn.Module] = field(default_factory=dict)
    # Called with each epoch's number (from 1) before it runs, resumed epochs included: a schedule of model state
    # that is a function of the epoch (QAT's BatchNorm freeze) holds across a kill.
    before_epoch: Callable[[int], None] | None = None


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a CUDA device that supports it (else fp16) and fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise InputError("distill.precision", "fp16 needs a CUDA device (its gradient scaler is CUDA-only); "
                         "use fp32 or bf16 on CPU")
    return precision


def make_optimizer(params, cfg, epochs: int, steps_per_epoch: int):
    params = [p for p in params if p.requires_grad]
    # One fused kernel per step instead of one per parameter tensor, where torch has it (CUDA parameters).
    fused = {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if cfg.scheduler == "cosine" else None
    return opt, schedule


def full_precision(device: torch.device):
    """Autocast off: distances, Gram matrices and MMD lose too much in bf16/fp16 (METHODS.md)."""
    return torch.autocast(device.type, enabled=False)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch: its fields, through dataclasses, dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def prefetched(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """On CUDA: each batch is prepared (gathered, converted, augmented, or copied from pinned memory) on a side
    stream while the step before it runs on the current stream. Elsewhere the batches as they come: a
    preparing thread would only compete with the step for the same cores."""
    if device.type != "cuda":
        return batches
    return _side_stream_batches(batches, device)


def _side_stream_batches(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    side, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(current)  # inputs made on the current stream before the epoch (data, teacher outputs) are ready

    def prepare() -> Batch | None:
        with torch.cuda.stream(side):
            return next(batches, None)

    upcoming = prepare()
    while upcoming is not None:
        current.wait_stream(side)  # the step waits for its batch only, not for the one queued after it
        for tensor in _tensors(upcoming):
            if tensor.is_cuda:
                tensor.record_stream(current)  # allocated on the side stream: not reused before the step is done
        batch, upcoming = upcoming, prepare()
        yield batch


def _unique(items: Iterable) -> list:
    """`items` without repeats (by identity), in order."""
    seen: dict[int, Any] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())


@dataclass
class _UpdateState:
    update: Update
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: Any
    params: list[nn.Parameter]


class Trainer:
    """Runs phases on one `Splits` with one optimizer setting; reports each epoch to `on_epoch`.

    precision: auto | fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler). compile_model: torch.compile
    the trained modules. checkpoint_dir: save each phase after every epoch and resume from it. teacher_online:
    run the teacher on every batch instead of caching its outputs (`distill.teacher_cache: off`).
    teacher_views, teacher_topk: with augmented data, the recorded views per image and the classes kept per
    view's soft label (kdpipe.teacher_views), for methods that read the teacher only through its softmax.
    """

    def __init__(self, data, *, epochs: int, batch_size: int, optimizer, seed: int,
                 on_epoch: EpochCallback | None = None, teacher_cache: TeacherOutputCache | None = None,
                 precision: str = "auto", compile_model: bool = False, checkpoint_dir: Path | None = None,
                 teacher_online: bool = False, teacher_views: int = 8, teacher_topk: int = 10):
        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.seed = seed
        self.on_epoch = on_epoch or (lambda label, epoch, epochs, metrics: None)
        self.teacher_cache = teacher_cache or TeacherOutputCache()
        self.device = data.y_train.device
        self.precision = resolve_precision(precision, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.compile_model = compile_model
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.teacher_online = teacher_online
        self.teacher_views, self.teacher_topk = teacher_views, teacher_topk
        self.views: TeacherViews | None = None  # once a teacher reads views, every batch replays them
        self.teacher_modes: list[dict[str, Any]] = []  # how each teacher() call serves the teacher, and why
        self.dist = distributed.current()
        self.channels_last = self.device.type == "cuda" and len(data.input_shape) == 3
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels once
        self._compiled: set[int] = set()
        self.epoch_log: list[dict[str, Any]] = []  # per epoch: phase, seconds, samples/s (report.json's summary)
        self.optimizer_steps = 0

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
        if self.static_batches:
            return self.full_batches
        return math.ceil(len(self.data.y_train) / self.batch_size)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def batches(self, generator: torch.Generator) -> Iterator[Batch]:
        ranks = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        if self.views is not None:
            source = self.data.view_batches(self.batch_size, generator, self.views.params, self.views.views, **ranks)
        else:
            source = ((index, None, x, y) for index, x, y in self.data.train_batches(self.batch_size, generator, **ranks))
        for index, view, x, y in source:
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(index, x, y, view)

    def teacher(self, teacher: nn.Module, taps: list[str], cacheable: bool = True,
                soft_labels: bool = False) -> TeacherFn:
        """The frozen teacher's outputs for a batch: looked up in the cache (one pass over the training split per
        content key); with augmented inputs, read from teacher views when the method reads only the teacher's
        softmax (`soft_labels`, no taps); else computed online, on exactly the student's batch. Online also when
        the method opts out (`cacheable=False`) or the pipeline turns the cache off."""
        self._prepare(teacher)
        if not cacheable:
            return self._online(teacher, taps, "the method's teacher changes while it trains")
        if self.teacher_online:
            return self._online(teacher, taps, "distill.teacher_cache is off")
        if not self.data.augmented:
            cached = self.teacher_cache.get(teacher, self.data, taps, autocast=self.autocast_dtype,
                                            channels_last=self.channels_last)
            self._record_mode("cached", "un-augmented inputs: one teacher pass over the training split")
            return lambda batch: cached.select(batch.index)
        if not soft_labels or taps:
            return self._online(teacher, taps, "augmented inputs, and the method reads teacher features or raw "
                                               "logits, which teacher views do not keep")
        start = time.perf_counter()
        self.views = teacher_views(self.teacher_cache, teacher, self.data, views=self.teacher_views,
                                   topk=self.teacher_topk, seed=self.seed, autocast=self.autocast_dtype,
                                   channels_last=self.channels_last)
        self._record_mode("views", "augmented inputs: the teacher's soft labels on recorded views, replayed",
                          views=self.views.views, topk=self.views.topk, seconds=time.perf_counter() - start)
        views = self.views
        # log p̂ stands in for the logits: a loss reading softmax(z / T) gets the stored distribution at T.
        return lambda batch: Outputs(views.log_probabilities(batch.index, batch.view))

    def _online(self, teacher: nn.Module, taps: list[str], reason: str) -> TeacherFn:
        self._record_mode("online", reason)
        return lambda batch: teacher_pass(teacher, batch.x, taps, self.autocast_dtype)

    def _record_mode(self, mode: str, reason: str, **details: Any) -> None:
        self.teacher_modes.append({"mode": mode, "reason": reason, **details})

    def _prepare(self, module: nn.Module) -> None:
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

    def _compile(self, module: nn.Module) -> None:
        """In place, so the method's own references to the module run compiled too. On CUDA in torch's
        reduce-overhead mode: the compiled forward and backward are captured once per shape as CUDA graphs
        (cudagraph trees) and replayed, one launch instead of one per kernel. On CPU the default mode."""
        if self.cuda_graphs:
            module.compile(mode="reduce-overhead")
        else:
            module.compile()

    def step_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """The epoch's batches as the steps take them: all of one shape under compile: true (the partial batch, the
        last one, is never drawn), and on CUDA each prepared while the step before it runs."""
        batches = self.batches(generator)
        if self.static_batches:
            batches = itertools.islice(batches, self.full_batches)
        return prefetched(batches, self.device)

    def val_accuracy(self, model: nn.Module) -> float:
        """Validation accuracy, each rank scoring its share of the validation split."""
        ranks, rank = self.dist.world_size, self.dist.rank
        x, y = self.data.x_val[rank::ranks], self.data.y_val[rank::ranks]
        with self.autocast():
            correct = (predict(model, x).logits.argmax(1) == y).sum()
        counts = distributed.all_reduce_sum(torch.stack([correct.double(), torch.tensor(len(y), dtype=torch.float64,
                                                                                         device=correct.device)]))
        return (counts[0] / counts[1]).item()

    # --- phases ---------------------------------------------------------------------------------------------

    def run(self, phases: Iterable[Phase]) -> dict[str, float]:
        """Run each phase in order (a generator may build the next phase from the previous one's result).

        Returns the last phase's final metrics, with `best_val_accuracy` of its first evaluated model.
        """
        result: dict[str, float] = {}
        for number, phase in enumerate(phases):
            result = self._run_phase(number, phase)
        return result

    def _checkpoint_path(self, number: int, phase: Phase) -> Path | None:
        return self.checkpoint_dir / f"{number}-{phase.name}.pt" if self.checkpoint_dir else None

    def _run_phase(self, number: int, phase: Phase) -> dict[str, float]:
        modules = _unique([m for u in phase.updates for m in u.modules] + list(phase.evaluate.values()))
        for module in modules:
            self._prepare(module)
            if self.compile_model and id(module) not in self._compiled:
                self._compile(module)
                self._compiled.add(id(module))
        updates = []
        for update in phase.updates:
            params = update.params if update.params is not None else [p for m in update.modules for p in m.parameters()]
            params = [p for p in _unique(params) if p.requires_grad]
            opt, schedule = make_optimizer(params, update.optimizer or self.optimizer, phase.epochs, self.steps_per_epoch)
            scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
            updates.append(_UpdateState(update, opt, schedule, scaler, params))
        generator = torch.Generator().manual_seed(self.seed)
        state: dict[str, Any] = {"epoch": 0, "best": {}, "metrics": {}, "finished": False}
        path = self._checkpoint_path(number, phase)
        if path is not None and path.is_file():
            state = self._restore(path, modules, updates, generator)
            if state["finished"]:
                return self._result(phase, state)
        for epoch in range(state["epoch"] + 1, phase.epochs + 1):
            if phase.before_epoch is not None:
                phase.before_epoch(epoch)
            state["metrics"] = self._epoch(phase, updates, modules, generator, epoch)
            for label, model in phase.evaluate.items():
                acc = state["metrics"][label]["val_accuracy"]
                if acc > state["best"].get(label, (-1.0, None))[0]:
                    state["best"][label] = (acc, copy.deepcopy(model.state_dict()))
            state["epoch"] = epoch
            if path is not None and self.dist.is_main:
                self._save(path, state, modules, updates, generator)
        for label, model in phase.evaluate.items():
            if label in state["best"]:
                model.load_state_dict(state["best"][label][1])
        state["finished"] = True
        if path is not None and self.dist.is_main:
            self._save(path, state, modules, updates, generator)
        return self._result(phase, state)

    @staticmethod
    def _result(phase: Phase, state: dict[str, Any]) -> dict[str, float]:
        labels = list(phase.evaluate) or [u.name for u in phase.updates]
        result = dict(state["metrics"].get(labels[0], {}))
        if phase.evaluate:
            result["best_val_accuracy"] = state["best"].get(labels[0], (-1.0, None))[0]
        return result

    def _epoch(self, phase: Phase, updates: list[_UpdateState], modules: list[nn.Module],
               generator: torch.Generator, epoch: int) -> dict[str, dict[str, float]]:
        for module in modules:
            module.train()
        start = time.perf_counter()
        names: dict[str, list[str]] = {}
        sums: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        count = steps = 0
        for batch in self.step_batches(generator):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
            shared: dict[str, Any] = {}
            for u in updates:
                with self.autocast():
                    loss, parts = u.update.loss(batch, shared)
                finite &= torch.isfinite(loss.detach())
                u.optimizer.zero_grad(set_to_none=True)
                if u.scaler is not None:
                    u.scaler.scale(loss).backward()
                    self._average_gradients(u.params)
                    u.scaler.step(u.optimizer)
                    u.scaler.update()
                else:
                    loss.backward()
                    self._average_gradients(u.params)
                    u.optimizer.step()
                if u.schedule is not None:
                    u.schedule.step()
                names[u.update.name] = ["loss", *parts]
                values = torch.stack([torch.as_tensor(v, device=self.device).float().reshape(())
                                      for v in (loss.detach(), *parts.values())]) * len(batch.y)
                sums[u.update.name] = sums[u.update.name] + values if u.update.name in sums else values
            count += len(batch.y)
            steps += 1
        for module in modules:
            distributed.broadcast_buffers(module)  # rank 0's BatchNorm statistics everywhere: one model to validate
        labels = list(names)
        flat = [sums[k].double() for k in labels] + [torch.tensor([float(count), float(steps)], dtype=torch.float64,
                                                                 device=self.device), (~finite).double().reshape(1)]
        totals = distributed.all_reduce_sum(torch.cat([t.reshape(-1) for t in flat]))
        samples, steps_all, nonfinite = totals[-3].item(), int(totals[-2].item()), totals[-1].item()
        seconds = time.perf_counter() - start  # after the first .item(), which waited for the device's queued steps
        if steps_all == 0:
            raise InputError("data.batch_size", f"{phase.name} made no optimizer step: every training batch is smaller "
                             f"than 2 samples per process (BatchNorm cannot train on one); raise data.batch_size")
        if nonfinite:
            raise FloatingPointError(f"{phase.name} loss became non-finite in epoch {epoch}; lower the learning rate")
        self.optimizer_steps += steps
        metrics: dict[str, dict[str, float]] = {}
        offset = 0
        for label in labels:
            metrics[label] = {f"train_{k}": (totals[offset + i] / samples).item() for i, k in enumerate(names[label])}
            offset += len(names[label])
        val_start = time.perf_counter()
        for label, model in phase.evaluate.items():
            metrics.setdefault(label, {})["val_accuracy"] = self.val_accuracy(model)
        val_seconds = time.perf_counter() - val_start
        first = labels[0] if not phase.evaluate else next(iter(phase.evaluate))
        timing = {"epoch_seconds": seconds, "samples_per_second": samples / seconds}
        if phase.evaluate:
            val_samples = len(self.data.y_val) * len(phase.evaluate)
            timing.update(val_seconds=val_seconds, val_samples_per_second=val_samples / max(val_seconds, 1e-9))
        metrics[first].update(timing)
        self.epoch_log.append({"phase": phase.name, "epoch": epoch, "samples": samples, **timing})
        for label, values in metrics.items():
            self.on_epoch(label, epoch, phase.epochs, values)
        return metrics

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

    def static_batch_summary(self) -> dict[str, Any] | None:
        """Under compile: true, the batch size trained on and the training samples each epoch leaves out."""
        if not self.static_batches:
            return None
        samples = len(self.data.y_train)
        return {"batch_size": self.batch_size, "last_partial_batch": "dropped",
                "dropped_per_epoch": samples - min(samples, self.full_batches * self.batch_size)}

    def timing_summary(self) -> dict[str, float] | None:
        """Median epoch seconds and training throughput over every epoch this trainer ran."""
        if not self.epoch_log:
            return None
        seconds = sorted(e["epoch_seconds"] for e in self.epoch_log)
        total_seconds = sum(seconds)
        summary = {"epochs": len(seconds), "median_epoch_seconds": seconds[len(seconds) // 2] if len(seconds) % 2
                   else (seconds[len(seconds) // 2 - 1] + seconds[len(seconds) // 2]) / 2,
                   "samples_per_second": sum(e["samples"] for e in self.epoch_log) / total_seconds,
                   "optimizer_steps": self.optimizer_steps}
        val = [e["val_samples_per_second"] for e in self.epoch_log if "val_samples_per_second" in e]
        if val:
            summary["val_samples_per_second"] = sorted(val)[len(val) // 2]
        return summary

    # --- checkpoints ----------------------------------------------------------------------------------------

    def _save(self, path: Path, state: dict[str, Any], modules, updates: list[_UpdateState], generator) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch({
            **state,
            "modules": [m.state_dict() for m in modules],
            "optimizers": [u.optimizer.state_dict() for u in updates],
            "schedules": [u.schedule.state_dict() if u.schedule is not None else None for u in updates],
            "scalers": [u.scaler.state_dict() if u.scaler is not None else None for u in updates],
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }, path)

    def _restore(self, path: Path, modules, updates: list[_UpdateState], generator) -> dict[str, Any]:
        saved = torch.load(path, map_location=self.device, weights_only=True)
        for module, module_state in zip(modules, saved["modules"]):
            module.load_state_dict(module_state)
        for u, opt_state, schedule_state, scaler_state in zip(updates, saved["optimizers"], saved["schedules"],
                                                              saved["scalers"]):
            u.optimizer.load_state_dict(opt_state)
            if u.schedule is not None and schedule_state is not None:
                u.schedule.load_state_dict(schedule_state)
            if u.scaler is not None and scaler_state is not None:
                u.scaler.load_state_dict(scaler_state)
        generator.set_state(saved["generator"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        if saved["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["cuda_rng"]])
        return {k: saved[k] for k in ("epoch", "best", "metrics", "finished")}
