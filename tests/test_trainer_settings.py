"""The loop's settings beyond the optimizer (TrainerSettings): LR warm-up, gradient clipping, gradient
accumulation, no weight decay on biases and norms, the EMA of the student; and the method checkpoint layout
(one tree per method) with the previous release's layout."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets
from kdpipe.config import OptimizerConfig
from kdpipe.errors import InputError
from kdpipe.methods import get_method
from kdpipe.pipeline import load_pipeline
from kdpipe.train import Phase, Trainer, TrainerSettings, Update, load_method, make_optimizer, save_method


def linear(data) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(data.input_shape)), data.num_classes))


def scratch(student: nn.Module, data):
    method = get_method("none")
    return method(method.Params(), student=student, teacher=None, num_classes=data.num_classes,
                  input_shape=data.input_shape)


def fit(data, student, *, batch_size=64, epochs=1, optimizer=None, **settings) -> tuple[nn.Module, Trainer]:
    trainer = Trainer(data, epochs=epochs, batch_size=batch_size, optimizer=optimizer or OptimizerConfig(), seed=0,
                      settings=TrainerSettings(**settings))
    return scratch(student, data).fit(trainer), trainer


def test_the_new_keys_reach_the_settings_and_default_to_todays_loop():
    pipeline = load_pipeline(PIPELINES / "digits.yaml", [
        "distill.warmup_epochs=2", "distill.warmup_start_factor=0.1", "distill.clip_grad_norm=1.5",
        "distill.grad_accum_steps=4", "distill.filter_bias_and_bn=true", "distill.ema={decay: 0.99, export: true}"])
    settings = TrainerSettings.of(pipeline.distill)
    assert (settings.warmup_epochs, settings.warmup_start_factor, settings.clip_grad_norm, settings.grad_accum_steps,
            settings.filter_bias_and_bn, settings.ema_decay, settings.ema_export) == (2, 0.1, 1.5, 4, True, 0.99, True)
    # The teacher's training keeps today's loop: its cache key does not hold the student's recipe.
    assert TrainerSettings.of(pipeline.distill, student=False) == TrainerSettings(precision=settings.precision)
    defaults = TrainerSettings.of(load_pipeline(PIPELINES / "digits.yaml", []).distill)
    assert (defaults.warmup_epochs, defaults.clip_grad_norm, defaults.grad_accum_steps, defaults.filter_bias_and_bn,
            defaults.ema_decay) == (0, None, 1, False, None)


def test_warmup_rises_linearly_from_the_start_factor_then_follows_the_cosine():
    params = [nn.Parameter(torch.zeros(2))]
    optimizer, schedule = make_optimizer(params, OptimizerConfig(lr=0.1), 10, 10, warmup_steps=20,
                                         warmup_start_factor=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.001)
    steps = np.diff(lrs[:21])
    assert np.allclose(steps, steps[0]) and steps[0] > 0  # linear, rising
    assert lrs[20] == pytest.approx(0.1)  # the base LR when the warm-up ends
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 80)) for t in range(80)]
    assert np.allclose(lrs[20:], cosine)
    # Without warm-up the schedule is today's, unchanged.
    _, plain = make_optimizer(params, OptimizerConfig(lr=0.1), 10, 10)
    assert isinstance(plain, torch.optim.lr_scheduler.CosineAnnealingLR)


def spiking(data, model: nn.Module, clip: float | None) -> nn.Module:
    """One epoch of a squared error whose third step is 10^20 times larger: a gradient spike."""
    step = {"n": 0}

    def loss(batch, shared):
        step["n"] += 1
        z = model(batch.x)
        mse = ((z - F.one_hot(batch.y, data.num_classes).float()) ** 2).mean()
        return mse * (1e20 if step["n"] == 3 else 1.0), {"mse": mse.detach()}

    trainer = Trainer(data, epochs=1, batch_size=64, optimizer=OptimizerConfig(), seed=0,
                      settings=TrainerSettings(clip_grad_norm=clip))
    trainer.run([Phase("student", [Update("student", [model], loss)], 1)])
    return model


def test_clipping_keeps_a_spiking_loss_finite_where_the_run_otherwise_ends(digits):
    with pytest.raises(FloatingPointError, match="non-finite"):
        spiking(digits, linear(digits), clip=None)
    model = spiking(digits, linear(digits), clip=1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulating_k_batches_steps_as_one_batch_k_times_larger(digits):
    optimizer = OptimizerConfig(lr=0.1, scheduler="none")
    initial = linear(digits)
    accumulated, trainer = fit(digits, copy.deepcopy(initial), batch_size=32, epochs=2, optimizer=optimizer,
                               grad_accum_steps=4)
    larger, reference = fit(digits, copy.deepcopy(initial), batch_size=128, epochs=2, optimizer=optimizer)
    assert trainer.optimizer_steps == reference.optimizer_steps == 2 * math.ceil(len(digits.y_train) / 128)
    for a, b in zip(accumulated.parameters(), larger.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(accumulated[1].weight, initial[1].weight)


def test_filter_bias_and_bn_takes_decay_off_biases_and_norm_weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(2, 1, 5, 5))
    cfg = OptimizerConfig(weight_decay=1e-3)
    optimizer, _ = make_optimizer(model.parameters(), cfg, 1, 1, filter_bias_and_bn=True)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                id(model[3].bias)}
    optimizer, _ = make_optimizer(model.parameters(), cfg, 1, 1)  # off: one group, every parameter decayed
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 1e-3


def test_ema_weights_are_the_exported_ones_with_export_true(digits):
    initial = linear(digits)
    seen = []  # the weights each training step starts from
    raw_model = copy.deepcopy(initial)
    raw_model[1].register_forward_pre_hook(
        lambda m, args: seen.append(copy.deepcopy(m.state_dict())) if m.training else None)
    raw, trainer = fit(digits, raw_model, ema_decay=0.5, ema_export=False)
    assert len(seen) == trainer.optimizer_steps
    expected = copy.deepcopy(seen[0])
    for weights in seen[1:] + [raw[1].state_dict()]:
        for k in expected:
            expected[k] = 0.5 * expected[k] + 0.5 * weights[k]
    averaged, _ = fit(digits, copy.deepcopy(initial), ema_decay=0.5, ema_export=True)
    for k, v in expected.items():
        torch.testing.assert_close(averaged[1].state_dict()[k], v, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(raw[1].state_dict()[k], v)  # export: false keeps the raw weights


def test_a_method_checkpoint_holds_its_whole_tree_and_restores_it(digits, tmp_path):
    from kdpipe.models.zoo import CNN

    dml = get_method("dml")
    build = lambda: dml(dml.Params(peers=2), student=CNN(digits.input_shape, 10, width=4, depth=2),  # noqa: E731
                        teacher=None, num_classes=10, input_shape=digits.input_shape, seed=3)
    trained = build()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    trained.exported_index.fill_(1)
    save_method(trained, tmp_path / "student.pt")
    fresh = build()
    load_method(fresh, tmp_path / "student.pt", torch.device("cpu"))
    assert fresh.exported() is fresh.peers[1]
    assert torch.equal(fresh.exported().fc.weight, trained.peers[1].fc.weight)


def test_a_previous_release_student_checkpoint_resumes_or_is_refused_in_one_line(digits, tmp_path):
    from kdpipe.models.zoo import CNN

    adversarial = get_method("adversarial")
    student = CNN(digits.input_shape, 10, width=4, depth=2)
    old = adversarial(adversarial.Params(hidden=8, blocks=1), student=copy.deepcopy(student), teacher=None,
                      num_classes=10, input_shape=digits.input_shape)
    torch.save({"student": old.student.state_dict(), "extra": old.discriminator.state_dict()}, tmp_path / "old.pt")
    new = adversarial(adversarial.Params(hidden=8, blocks=1), student=CNN(digits.input_shape, 10, width=4, depth=2),
                      teacher=None, num_classes=10, input_shape=digits.input_shape)
    load_method(new, tmp_path / "old.pt", torch.device("cpu"))
    assert torch.equal(new.discriminator.stem.weight, old.discriminator.stem.weight)
    assert torch.equal(new.student.fc.weight, old.student.fc.weight)

    ban = get_method("ban")
    generations = ban(ban.Params(generations=2), student=student, teacher=None, num_classes=10,
                      input_shape=digits.input_shape)
    torch.save({"student": student.state_dict(), "extra": nn.ModuleList([student]).state_dict()}, tmp_path / "ban.pt")
    with pytest.raises(InputError) as refused:
        load_method(generations, tmp_path / "ban.pt", torch.device("cpu"))
    assert refused.value.key == "--resume" and "\n" not in str(refused.value)
    assert "cannot be restored" in str(refused.value)


def test_a_previous_release_phase_checkpoint_resumes_with_an_ema(digits, tmp_path):
    """A phase checkpoint without EMA state (the previous release's) resumes; the EMA starts from its weights."""
    student = linear(digits)
    fit(digits, copy.deepcopy(student), epochs=2, checkpoint_dir=tmp_path)
    path = next(tmp_path.glob("*.pt"))
    saved = torch.load(path, weights_only=False)
    del saved["ema"]
    saved.update(epoch=1, finished=False)
    torch.save(saved, path)
    resumed, trainer = fit(digits, copy.deepcopy(student), epochs=2, checkpoint_dir=tmp_path, ema_decay=0.9)
    assert [e["epoch"] for e in trainer.epoch_log] == [2]
    assert all(torch.isfinite(p).all() for p in resumed.parameters())


@pytest.mark.slow
def test_a_run_with_every_new_key_trains_exports_the_ema_and_resumes_from_its_student(workdir):
    """The keys travel pipeline → runner → distill: the run trains, logs the EMA beside the raw score, and its
    student.pt (one method tree) restores on --resume."""
    recipe = ["distill.warmup_epochs=1", "distill.clip_grad_norm=5.0", "distill.grad_accum_steps=2",
              "distill.filter_bias_and_bn=true", "distill.ema={decay: 0.9, export: true}"]
    first = cli("run", PIPELINES / "digits.yaml", "--until", "distill", *sets(*FAST, *LENIENT, *recipe))
    assert first.exit_code == 0, first.output
    report = read_report(first.stdout)
    # Above chance (0.1): half the steps (accumulation) and a slow warm-up learn less in FAST's 6 epochs.
    assert report["status"] == "stopped" and report["student"]["val_accuracy"] > 0.15
    saved = torch.load(f"{report['run_dir']}/student.pt", weights_only=True)
    assert saved["format"] == 2 and {f"student.{k}" for k in saved["student"]} <= set(saved["state"])
    resumed = cli("run", "--resume", report["run_dir"])
    assert resumed.exit_code in (0, 1), resumed.output  # 1: a latency gate on a busy machine
    assert "student epoch" not in resumed.output  # distill restored from student.pt, not trained again
