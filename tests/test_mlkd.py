"""MLKD (issue 20): the batch and class correlation losses against the hand-written references, the reference
total term by term in both masking modes and under logit standardization, the confidence masks, and the two-view
training with the teacher online on both views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reference_losses as R
from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets
from kdpipe.losses import batch_correlation_loss, class_correlation_loss
from kdpipe.methods import get_method

RTOL = 1e-5


def logits(n: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("n, c, temperature", [(16, 10, 4.0), (7, 5, 2.0), (32, 100, 6.0)])
def test_batch_and_class_correlation_losses_match_the_references(n, c, temperature):
    s, t = logits(n, c, 0), logits(n, c, 1)
    assert batch_correlation_loss(s, t, temperature).item() == pytest.approx(
        R.batch_correlation_loss(s.numpy(), t.numpy(), temperature), rel=RTOL)
    assert class_correlation_loss(s, t, temperature).item() == pytest.approx(
        R.class_correlation_loss(s.numpy(), t.numpy(), temperature), rel=RTOL)


def test_correlation_losses_vanish_for_equal_logits_and_are_differentiable():
    s = logits(8, 10, 0).requires_grad_()
    for loss in (batch_correlation_loss, class_correlation_loss):
        assert loss(s.detach(), s.detach(), 4.0).item() == 0.0
        value = loss(s, logits(8, 10, 1), 4.0)
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def class_columns_reference(s, t, temperature, classes) -> float:
    """‖P_tᵀP_t − P_sᵀP_s‖² over the masked classes' columns of P (softmax over all classes) / their count."""
    p_s, p_t = R.softmax(s / temperature), R.softmax(t / temperature)
    kept = [c for c in range(s.shape[1]) if classes[c]]
    total = 0.0
    for a in kept:
        for b in kept:
            total += (sum(p_t[m, a] * p_t[m, b] for m in range(len(s)))
                      - sum(p_s[m, a] * p_s[m, b] for m in range(len(s)))) ** 2
    return total / len(kept)


def standardize(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)


def cross_entropy(z: np.ndarray, y: np.ndarray) -> float:
    p = R.softmax(z)
    return -float(np.mean([np.log(p[n, y[n]]) for n in range(len(y))]))


def reference_total(y, s_weak, t_weak, s_strong, t_strong, *, temperature=4.0, weight=0.9, ce_weight=0.1,
                    masking="reference", logit_stand=False, base_temperature=2.0) -> float:
    """METHODS.md's MLKD total, term by term, from the references."""
    p_t = R.softmax(t_weak)  # T = 1, raw logits
    confidence, class_confidence = p_t.max(1), p_t.sum(0)
    samples = confidence <= np.percentile(confidence, 50)
    classes = class_confidence <= np.percentile(class_confidence, 50)
    kd_s_weak, kd_t_weak, kd_s_strong, kd_t_strong = ((standardize(z) for z in (s_weak, t_weak, s_strong, t_strong))
                                                      if logit_stand else (s_weak, t_weak, s_strong, t_strong))
    kd_temperature = base_temperature if logit_stand else temperature
    total = ce_weight * (cross_entropy(s_weak, y) + cross_entropy(s_strong, y))
    for kd_t, t in [(kd_temperature, temperature), (3.0, 3.0), (5.0, 5.0), (2.0, 2.0), (6.0, 6.0)]:
        if masking == "reference":
            total += weight * (samples.mean() * R.kd_loss(kd_s_weak, kd_t_weak, kd_t)
                               + samples.mean() * R.batch_correlation_loss(s_weak, t_weak, t)
                               + classes.mean() * R.class_correlation_loss(s_weak, t_weak, t))
        else:
            total += weight * (R.kd_loss(kd_s_weak[samples], kd_t_weak[samples], kd_t)
                               + R.batch_correlation_loss(s_weak[samples], t_weak[samples], t)
                               + class_columns_reference(s_weak, t_weak, t, classes))
    for t in (kd_temperature, 3.0, 5.0):
        total += weight * R.kd_loss(kd_s_strong, kd_t_strong, t)
    for t in (2.0, 6.0):  # the reference's "strong" terms at T = 2, 6 read the weak logits
        total += weight * R.kd_loss(kd_s_weak, kd_t_weak, t)
    return total


def build(**params):
    cls = get_method("mlkd")
    return cls(cls.Params(**params), student=nn.Linear(4, 10), teacher=nn.Linear(4, 10), num_classes=10,
               input_shape=(4,))


def random_views(n: int = 24, c: int = 10, seed: int = 0):
    y = torch.randint(c, (n,), generator=torch.Generator().manual_seed(seed))
    return (y, *(logits(n, c, seed + k) for k in range(1, 5)))


@pytest.mark.parametrize("params", [
    {}, {"masking": "per_sample"}, {"temperature": 3.0, "weight": 1.7, "ce_weight": 0.5},
    {"logit_stand": True, "base_temperature": 2.0},
    {"logit_stand": True, "base_temperature": 3.0, "masking": "per_sample"},
])
def test_the_total_matches_the_reference_term_by_term(params):
    views = random_views()
    total, parts = build(**params).total(*views)
    expected = reference_total(*(v.numpy() for v in views), **params)
    assert total.item() == pytest.approx(expected, rel=RTOL)
    assert set(parts) == {"ce", "kd_weak", "batch", "class", "kd_strong"}


def test_reference_masking_keeps_the_low_confidence_half_and_scales_by_its_fraction():
    y, s_weak, t_weak, s_strong, t_strong = random_views(n=32)
    _, reference = build().total(y, s_weak, t_weak, s_strong, t_strong)
    _, unmasked_kd = build(masking="per_sample").total(y, s_weak, t_weak, s_strong, t_strong)
    from kdpipe.losses import kd_loss

    full = sum(kd_loss(s_weak, t_weak, t) for t in (4.0, 3.0, 5.0, 2.0, 6.0))
    assert reference["kd_weak"].item() == pytest.approx(0.5 * full.item(), rel=RTOL)  # 16 of 32 samples kept
    full_class = sum(class_correlation_loss(s_weak, t_weak, t) for t in (4.0, 3.0, 5.0, 2.0, 6.0))
    assert reference["class"].item() == pytest.approx(0.5 * full_class.item(), rel=RTOL)  # 5 of 10 classes
    confidence = torch.softmax(t_weak, 1).amax(1)
    low = confidence <= confidence.median()
    masked = sum(kd_loss(s_weak[low], t_weak[low], t) for t in (4.0, 3.0, 5.0, 2.0, 6.0))
    assert unmasked_kd["kd_weak"].item() == pytest.approx(masked.item(), rel=RTOL)  # the low-confidence half


def test_the_total_is_fp32_under_bf16_autocast_and_trains_the_student():
    views = random_views()
    student_weak = views[1].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = build().total(views[0], student_weak.bfloat16(), views[2].bfloat16(), views[3].bfloat16(),
                                     views[4].bfloat16())
    assert parts["batch"].dtype == parts["class"].dtype == parts["kd_weak"].dtype == torch.float32
    (grad,) = torch.autograd.grad(total, student_weak)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_mlkd_declares_its_paper_and_two_views():
    cls = get_method("mlkd")
    assert cls.two_views and cls.family == "logit" and cls.year == 2023 and "Multi-Level" in cls.paper
    assert cls.Params().weight == 0.9 and cls.Params().ce_weight == 0.1 and cls.Params().masking == "reference"


@pytest.mark.slow
def test_mlkd_trains_on_two_views_with_the_teacher_online_on_both(workdir, monkeypatch):
    """The loop fills Batch.x_strong for MLKD's phase; the teacher runs on the weak and the strong view of each
    step's images; report.json says online and why."""
    from kdpipe.train.serving import TeacherServing

    seen = []
    online = TeacherServing._online

    def recording(self, teacher, taps, reason):
        serve = online(self, teacher, taps, reason)
        return lambda batch: seen.append((batch.x.shape, batch.x_strong is not None)) or serve(batch)

    monkeypatch.setattr(TeacherServing, "_online", recording)
    result = cli("run", PIPELINES / "mlkd.yaml", "--until", "distill", *sets(*FAST, *LENIENT, "distill.epochs=1"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    (mode,) = report["distill"]["teacher"]
    assert mode["mode"] == "online" and mode["reason"].startswith("two views per image")
    assert len(seen) == 2 * report["distill"]["optimizer_steps"]  # weak and strong view, each step
    assert all(has_strong for _, has_strong in seen[::2])  # the weak batch carries its strong view
