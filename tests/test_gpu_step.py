"""The GPU step's CPU-visible parts: no host sync per step, static batches under compile: true, the teacher pass's
largest batch, the step's batch prefetch helpers, and benchmarks/gpu.py's skip line. Nothing here needs a GPU."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST, PIPELINES, ROOT, cli, read_report, sets
from torch import nn
from torch.overrides import TorchFunctionMode

from kdpipe.config import ModelConfig, OptimizerConfig
from kdpipe.methods import get_method
from kdpipe.models import build_model
from kdpipe.teacher_cache import largest_batch
from kdpipe.train import Batch, Trainer, TrainerSettings, _tensors, prefetched

# Tensor calls that make the host wait for the device (on CUDA) to read a value back.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}


class HostReads(TorchFunctionMode):
    """Counts the tensor calls in HOST_READS made while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def fit(data, batch_size: int, epochs: int = 1, compile_model: bool = False, method: str = "kd") -> tuple[Trainer, nn.Module]:
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(arch="cnn", width=16, depth=2), "teacher", data.input_shape, data.num_classes)
    student = build_model(ModelConfig(arch="cnn", width=8, depth=2), "student", data.input_shape, data.num_classes)
    trainer = Trainer(data, epochs=epochs, batch_size=batch_size, optimizer=OptimizerConfig(lr=0.05), seed=0,
                      settings=TrainerSettings(compile=compile_model))
    cls = get_method(method)
    cls(cls.Params(), student=student, teacher=teacher, num_classes=data.num_classes,
        input_shape=data.input_shape).fit(trainer)
    return trainer, student


def test_host_reads_per_epoch_do_not_grow_with_the_steps(digits):
    """An epoch of 37 steps reads as many values back from the device as one of 5: none of them is per step."""
    counts = {}
    for batch_size in (32, 256):
        with HostReads() as reads:
            trainer, _ = fit(digits, batch_size)
        counts[trainer.optimizer_steps] = reads.count
    assert sorted(counts) == [5, 37]
    assert counts[5] == counts[37] > 0  # > 0: the per-epoch reads (metrics, finiteness, validation) are seen


def test_host_reads_counter_sees_a_per_step_read(digits):
    """The counter above would catch a finiteness check made in Python on every step (what the loop once did)."""
    steps = 0
    with HostReads() as reads:
        for batch in Trainer(digits, epochs=1, batch_size=32, optimizer=OptimizerConfig(), seed=0).step_batches(
                torch.Generator().manual_seed(0)):
            steps += 1
            bool(torch.isfinite(batch.x).all())
    assert reads.count == steps == 37


@pytest.mark.slow
def test_compile_trains_on_full_batches_and_reports_the_samples_left_out(digits):
    """compile: true on CPU (plain torch.compile): every step takes a full batch of 64; the 1169 − 18·64 = 17
    samples of the partial batch are left out each epoch, which the summary says; the student still learns."""
    trainer, student = fit(digits, 64, epochs=3, compile_model=True, method="none")
    assert len(digits.y_train) == 1169
    assert trainer.optimizer_steps == 3 * 18 == 3 * trainer.steps_per_epoch
    assert [e["samples"] for e in trainer.epoch_log] == [18 * 64] * 3
    assert trainer.static_batch_summary() == {"batch_size": 64, "last_partial_batch": "dropped", "dropped_per_epoch": 17}
    assert trainer.val_accuracy(student) > 0.5


@pytest.mark.slow
def test_a_compiled_run_reports_its_static_batches(workdir):
    """report.json of a run with distill.compile: true says the partial batch was dropped and how many samples."""
    result = cli("run", PIPELINES / "digits.yaml", *sets(*FAST, "distill.compile=true", "validate.gates.accuracy_min=0",
                                                        "validate.gates.max_accuracy_drop_vs_teacher=1"))
    assert result.exit_code == 0, result.output
    distill = read_report(result.stdout)["distill"]
    assert distill["static_batches"] == {"batch_size": 64, "last_partial_batch": "dropped", "dropped_per_epoch": 17}
    assert distill["optimizer_steps"] == 6 * 18


def test_without_compile_every_sample_trains_and_nothing_is_reported(digits):
    trainer, _ = fit(digits, 64, epochs=1)
    assert trainer.optimizer_steps == 19 == trainer.steps_per_epoch
    assert trainer.epoch_log[0]["samples"] == len(digits.y_train)
    assert trainer.static_batch_summary() is None


def test_a_split_smaller_than_a_batch_is_one_static_batch_with_nothing_left_out(digits):
    trainer = Trainer(digits, epochs=1, batch_size=4096, optimizer=OptimizerConfig(), seed=0,
                      settings=TrainerSettings(compile=True))
    batches = list(trainer.step_batches(torch.Generator().manual_seed(0)))
    assert [len(b.y) for b in batches] == [len(digits.y_train)]
    assert trainer.static_batch_summary()["dropped_per_epoch"] == 0


def test_cpu_batches_are_not_wrapped():
    """On CPU the step takes the batches as they come: no side stream, no preparing thread."""
    batches = iter([Batch(torch.arange(2), torch.zeros(2, 3), torch.zeros(2))])
    assert prefetched(batches, torch.device("cpu")) is batches


def test_every_tensor_of_a_batch_is_found_for_the_side_stream():
    """The CUDA prefetch marks each tensor of a batch as used by the step; fields nest (views carry targets)."""

    @dataclasses.dataclass
    class Targets:
        probs: torch.Tensor
        extra: dict

    a, b, c, d, e = (torch.zeros(1) for _ in range(5))

    @dataclasses.dataclass
    class ViewBatch(Batch):
        targets: Targets | None = None
        names: tuple = ()

    batch = ViewBatch(a, b, c, Targets(d, {"k": [e, "not a tensor"]}), ("x",))
    assert [id(t) for t in _tensors(batch)] == [id(t) for t in (a, b, c, d, e)]


def test_largest_batch_halves_until_the_pass_fits():
    tried = []

    def fits_up_to_300(batch: int) -> str:
        tried.append(batch)
        if batch > 300:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {batch} rows")
        return f"done at {batch}"

    assert largest_batch(fits_up_to_300, 4096) == ("done at 256", 256)
    assert tried == [4096, 2048, 1024, 512, 256]


def test_largest_batch_gives_up_at_one_and_never_retries_other_errors():
    tried = []

    def never_fits(batch: int):
        tried.append(batch)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        largest_batch(never_fits, 8)
    assert tried == [8, 4, 2, 1]

    def broken(batch: int):
        tried.append(batch)
        raise ValueError("not a memory problem")

    tried.clear()
    with pytest.raises(ValueError):
        largest_batch(broken, 8)
    assert tried == [8]


def test_gpu_benchmark_prints_one_skip_line_without_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["benchmarks/gpu.py: skipped: torch sees no CUDA device on this machine"]
