"""The teacher-output cache: the same losses as the teacher run online, one teacher pass, spilling to disk."""

from __future__ import annotations

import torch

from kdpipe.config import ModelConfig, OptimizerConfig
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.methods import get_method
from kdpipe.models import build_model
from kdpipe.teacher_cache import SpilledOutputs, TeacherOutputCache
from kdpipe.train import Trainer, TrainerSettings
from conftest import PIPELINES, cli

EPOCHS = 2


def distill(method: str, *, teacher_online: bool = False, cache: TeacherOutputCache | None = None, **params):
    """Per-epoch metrics of `method` distilling a fixed random cnn teacher into a fixed student on digits."""
    data = load_data(data_config(), seed=0)
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(arch="cnn", width=16, depth=3), "teacher", data.input_shape, data.num_classes)
    student = build_model(ModelConfig(arch="cnn", width=8, depth=2), "student", data.input_shape, data.num_classes)
    history: list[dict[str, float]] = []
    trainer = Trainer(data, epochs=EPOCHS, batch_size=64, optimizer=OptimizerConfig(lr=0.05), seed=0,
                      on_epoch=lambda label, epoch, epochs, metrics: history.append(metrics),
                      settings=TrainerSettings(teacher_cache=cache, teacher_online=teacher_online))
    cls = get_method(method)
    cls(cls.Params(**params), student=student, teacher=teacher, num_classes=data.num_classes,
        input_shape=data.input_shape).fit(trainer)
    return history, trainer.teacher_cache


TIMINGS = {"epoch_seconds", "samples_per_second", "val_seconds", "val_samples_per_second"}


def assert_same_history(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b) == EPOCHS
    for got, expected in zip(a, b):
        assert got.keys() == expected.keys()
        for key in set(got) - TIMINGS:
            assert abs(got[key] - expected[key]) <= 1e-4 * max(1.0, abs(expected[key])), (key, got, expected)


def test_cached_teacher_gives_the_online_losses_with_one_teacher_pass():
    online, online_cache = distill("kd", teacher_online=True)
    cached, cache = distill("kd")
    assert_same_history(cached, online)
    assert cache.forward_passes == 1  # one pass over the training split, for every epoch
    assert online_cache.forward_passes == 0
    assert online[-1]["train_kd"] > 0


def test_feature_taps_cached_and_spilled_to_disk_match_online(tmp_path):
    """A feature method's tapped teacher maps: in memory, or over the memory budget and memory-mapped from disk."""
    online, _ = distill("fitnets", teacher_online=True, stages=1)
    spilled, cache = distill("fitnets", cache=TeacherOutputCache(tmp_path, memory_budget_mb=0), stages=1)
    assert_same_history(spilled, online)
    assert cache.spilled == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    assert all(isinstance(outputs, SpilledOutputs) for outputs in cache._memory.values())
    assert "train_hint" in spilled[-1]


def test_disk_cache_is_shared_by_content_hash(tmp_path):
    _, first = distill("kd", cache=TeacherOutputCache(tmp_path))
    _, second = distill("kd", cache=TeacherOutputCache(tmp_path))  # a new process would see the same file
    assert first.forward_passes == 1 and second.forward_passes == 0


def test_precision_and_cache_settings_are_validated(workdir):
    ok = cli("check", PIPELINES / "digits.yaml", "--set", "distill.teacher_cache=off", "--set", "distill.precision=bf16")
    assert ok.exit_code == 0, ok.output
    fp16 = cli("check", PIPELINES / "digits.yaml", "--set", "distill.precision=fp16", "--set", "distill.device=cpu")
    assert fp16.exit_code == 2 and "distill.precision: fp16 needs a CUDA device" in fp16.output
    bad = cli("check", PIPELINES / "digits.yaml", "--set", "distill.teacher_cache=sometimes")
    assert bad.exit_code == 2 and "distill.teacher_cache" in bad.output


def test_teacher_outputs_are_keyed_by_content_not_by_object(digits):
    """Two networks with the same weights share one entry; a network whose weights changed (or a new network
    that happens to get a freed one's id) gets its own: ids are never keys."""
    from kdpipe.models.zoo import CNN

    cache = TeacherOutputCache()
    torch.manual_seed(0)
    first = CNN(digits.input_shape, 10, width=8, depth=2)
    a = cache.get(first, digits, [])
    twin = CNN(digits.input_shape, 10, width=8, depth=2)
    twin.load_state_dict(first.state_dict())
    assert cache.get(twin, digits, []) is a and cache.forward_passes == 1
    with torch.no_grad():
        first.fc.bias.add_(1.0)
    b = cache.get(first, digits, [])
    assert cache.forward_passes == 2 and not torch.equal(a.logits, b.logits)


def test_memory_entries_leave_least_recently_used_first_under_the_budget(digits):
    from kdpipe.models.zoo import CNN
    from kdpipe.teacher_cache import nbytes

    torch.manual_seed(0)
    nets = [CNN(digits.input_shape, 10, width=8, depth=2) for _ in range(3)]
    one = nbytes(TeacherOutputCache().get(nets[0], digits, []))
    cache = TeacherOutputCache(memory_budget_mb=2.5 * one / 2**20)
    for net in nets:
        cache.get(net, digits, [])
    assert len(cache._memory) == 2 and cache.spilled == 0  # the first entry was evicted to make room
    cache.get(nets[0], digits, [])
    assert cache.forward_passes == 4
