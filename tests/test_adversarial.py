"""`adversarial`: the discriminator on logits, the alternation (D step with the student frozen, then the
student step with D frozen), the aux classifier, bad input and end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, LENIENT, PIPELINES, cli, read_report
from kdpipe.config import OptimizerConfig
from kdpipe.losses import adversarial_d_loss, adversarial_g_loss
from kdpipe.methods import get_method
from kdpipe.methods.adversarial import Discriminator
from kdpipe.models.zoo import CNN
from kdpipe.taps import Outputs
from kdpipe.train import Batch, Trainer, TrainerSettings, make_optimizer


def build(digits, **params):
    cls = get_method("adversarial")
    torch.manual_seed(0)
    teacher = CNN(digits.input_shape, 10, width=16, depth=2).eval()
    student = CNN(digits.input_shape, 10, width=8, depth=2)
    return cls(cls.Params(**params), student=student, teacher=teacher, num_classes=10, input_shape=digits.input_shape)


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module, before):
    return all(torch.equal(b, p) for b, p in zip(before, module.parameters()))


def batch_of(digits, n=32):
    idx = torch.arange(n)
    return Batch(idx, digits.x_train[idx], digits.y_train[idx])


def test_discriminator_is_a_residual_mlp_on_logits_with_optional_class_head():
    d = Discriminator(10, hidden=32, blocks=2)
    scores, classes = d(torch.randn(5, 10))
    assert scores.shape == (5,) and classes is None
    assert len(d.blocks) == 2 and d.stem.out_features == 32
    scores, classes = Discriminator(10, hidden=32, blocks=2, aux=True)(torch.randn(5, 10))
    assert scores.shape == (5,) and classes.shape == (5, 10)


def d_step(method, z_s, z_t, y) -> torch.Tensor:
    optimizer, _ = make_optimizer(method.discriminator.parameters(), OptimizerConfig(name="adam", lr=1e-3, scheduler="none"), 1, 1)
    loss, _ = method.discriminator_loss(z_s, z_t, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_the_default_discriminator_is_conditional(digits):
    """The paper's discriminator has a class head (METHODS.md): aux_classifier is on unless turned off."""
    method = build(digits, hidden=32, blocks=1)
    assert method.params.aux_classifier is True
    _, classes = method.discriminator(torch.randn(3, 10))
    assert classes.shape == (3, 10)


@pytest.mark.parametrize("params", [{"aux_classifier": False}, {"gan_mode": "bce"}])
def test_discriminator_step_trains_d_and_leaves_the_student_unchanged(digits, params):
    method = build(digits, hidden=32, blocks=1, **params)
    batch = batch_of(digits)
    z_s = method.student(batch.x)
    z_t = method.teacher(batch.x).detach()
    student_before, d_before = snapshot(method.student), snapshot(method.discriminator)
    loss = d_step(method, z_s, z_t, batch.y)
    assert unchanged(method.student, student_before)
    assert all(p.grad is None for p in method.student.parameters())
    assert not unchanged(method.discriminator, d_before)
    assert loss.item() > 0


def test_class_weight_multiplies_the_class_head_ce_in_both_losses(digits):
    method = build(digits, hidden=16, blocks=1, class_weight=3.0)
    batch = batch_of(digits, 8)
    z_s, z_t = torch.randn(8, 10), torch.randn(8, 10)
    with torch.no_grad():
        d_t, c_t = method.discriminator(z_t)
        d_s, c_s = method.discriminator(z_s)
    d_loss, _ = method.discriminator_loss(z_s, z_t, batch.y)
    expected = adversarial_d_loss(d_t, d_s, mode="lsgan") + 3.0 * (F.cross_entropy(c_t, batch.y) + F.cross_entropy(c_s, batch.y))
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    total, parts = method.loss(batch, Outputs(z_s), Outputs(z_t))
    p = method.params
    expected = p.adv_weight * parts["adversarial"] + p.l1_weight * parts["l1"] + p.ce_weight * parts["ce"] + 3.0 * parts["class_ce"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("params", [{"aux_classifier": False}, {}])
def test_student_step_trains_the_student_and_leaves_d_unchanged(digits, params):
    method = build(digits, hidden=32, blocks=1, **params)
    batch = batch_of(digits)
    z_t = method.teacher(batch.x).detach()
    optimizer, _ = make_optimizer(method.student.parameters(), OptimizerConfig(scheduler="none"), 1, 1)
    student_before, d_before = snapshot(method.student), snapshot(method.discriminator)
    loss, parts = method.loss(batch, Outputs(method.student(batch.x)), Outputs(z_t))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert unchanged(method.discriminator, d_before)
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert all(p.requires_grad for p in method.discriminator.parameters())  # frozen only while the loss was built
    assert not unchanged(method.student, student_before)
    # total = adv_weight·adversarial + l1_weight·L1 + ce_weight·CE (+ class-head CE with the aux head)
    p = method.params
    expected = p.adv_weight * parts["adversarial"] + p.l1_weight * parts["l1"] + p.ce_weight * parts["ce"]
    if p.aux_classifier:
        expected = expected + parts["class_ce"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_losses_follow_the_gan_mode(digits):
    method = build(digits, hidden=16, blocks=1, gan_mode="bce", aux_classifier=False)
    batch = batch_of(digits, 8)
    z_s, z_t = torch.randn(8, 10), torch.randn(8, 10)
    _, parts = method.loss(batch, Outputs(z_s), Outputs(z_t))
    with torch.no_grad():
        d_s, _ = method.discriminator(z_s)
    assert parts["adversarial"].item() == pytest.approx(adversarial_g_loss(d_s, mode="bce").item(), rel=1e-6)
    assert parts["l1"].item() == pytest.approx((z_s - z_t).abs().mean().item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(z_s, batch.y).item(), rel=1e-6)
    with torch.no_grad():
        d_t, _ = method.discriminator(z_t)
        expected = adversarial_d_loss(d_t, d_s, mode="bce").item()
    d_loss, _ = method.discriminator_loss(z_s, z_t, batch.y)
    assert d_loss.item() == pytest.approx(expected, rel=1e-6)


def test_fit_trains_student_and_discriminator_and_never_the_teacher(digits):
    method = build(digits, hidden=32, blocks=1)
    teacher_before, d_before = snapshot(method.teacher), snapshot(method.discriminator)
    trainer = Trainer(digits, epochs=1, batch_size=128, optimizer=OptimizerConfig(), seed=0)
    student = method.fit(trainer)
    assert student is method.student
    assert method.extra_modules() is method.discriminator
    assert unchanged(method.teacher, teacher_before)
    assert not unchanged(method.discriminator, d_before)


def test_the_discriminator_and_its_optimizer_are_checkpointed_and_resumed(digits, tmp_path):
    """D is an update of the one loop: its weights and Adam state are in the phase checkpoint, and a resumed
    fit continues from them (before, a resumed run restarted D from scratch)."""
    method = build(digits, hidden=32, blocks=1)
    Trainer(digits, epochs=1, batch_size=128, optimizer=OptimizerConfig(), seed=0,
            settings=TrainerSettings(checkpoint_dir=tmp_path)).run(
        [next(method.phases(Trainer(digits, epochs=1, batch_size=128, optimizer=OptimizerConfig(), seed=0)))])
    saved = torch.load(next(tmp_path.glob("*.pt")), weights_only=True)
    d_state = saved["modules"][0]
    assert "stem.weight" in d_state and torch.equal(d_state["stem.weight"], method.discriminator.stem.weight)
    assert len(saved["optimizers"]) == 2 and saved["optimizers"][0]["state"]  # Adam moments of D
    assert saved["optimizers"][0]["param_groups"][0]["lr"] == method.params.d_lr
    fresh = build(digits, hidden=32, blocks=1)
    trainer = Trainer(digits, epochs=1, batch_size=128, optimizer=OptimizerConfig(), seed=0,
                      settings=TrainerSettings(checkpoint_dir=tmp_path))
    trainer.run(fresh.phases(trainer))
    assert torch.equal(fresh.discriminator.stem.weight, method.discriminator.stem.weight)


def test_unknown_gan_mode_exits_2(workdir):
    pipeline = PIPELINES / "adversarial.yaml"
    result = cli("check", pipeline, "--set", "distill.params.gan_mode=wgan")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "distill.params.gan_mode" in lines[0] and "lsgan" in lines[0], lines


@pytest.mark.slow
def test_end_to_end_checkpoints_the_discriminator(workdir):
    result = cli("run", PIPELINES / "adversarial.yaml", *[a for o in (*FAST, *LENIENT) for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed" and report["student"]["accuracy"] > 0.5
    checkpoint = torch.load(f"{report['run_dir']}/student.pt", weights_only=True)
    assert "discriminator.stem.weight" in checkpoint["state"] and "fc.weight" in checkpoint["student"]
