"""`pkt` and `vid` (issue 20): their losses against the hand-written references, the facts METHODS.md states, the
default layers, what is exported, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference_losses as ref
from conftest import PIPELINES, cli, sets
from kdpipe.config import TapsConfig
from kdpipe.losses import pkt_loss, vid_loss
from kdpipe.taps import Outputs
from kdpipe.train import Batch
from test_relation_methods import build

RTOL = 1e-5


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, d_s, d_t", [(3, 4, 6), (8, 16, 16), (17, 5, 32)])
def test_pkt_loss_matches_reference_in_fp32(n, d_s, d_t):
    s, t = randn(n, d_s, seed=1), randn(n, d_t, seed=2)
    assert pkt_loss(s, t).item() == pytest.approx(ref.pkt_loss(s.numpy(), t.numpy()), rel=RTOL)


def test_pkt_loss_is_zero_for_equal_embeddings_and_a_zero_row_is_no_nan():
    emb = randn(6, 10, seed=3)
    assert pkt_loss(emb, emb).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt_loss(3.0 * emb, emb).item() == pytest.approx(0.0, abs=1e-7)  # cosines ignore the scale
    emb[2] = 0.0  # x/(‖x‖ + eps) of a zero row is 0, its similarities ½
    assert torch.isfinite(pkt_loss(emb, randn(6, 4, seed=4)))
    assert pkt_loss(randn(6, 10, seed=5), randn(6, 10, seed=6)).item() > 0


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (5, 6, 2, 3), (4, 1, 1, 1)])
def test_vid_loss_matches_reference_in_fp32(shape):
    mu, t = randn(*shape, seed=7), randn(*shape, seed=8)
    alpha = randn(shape[1], seed=9)
    assert vid_loss(mu, t, alpha).item() == pytest.approx(ref.vid_loss(mu.numpy(), t.numpy(), alpha.numpy()), rel=RTOL)


def test_vid_variance_starts_at_5_and_the_loss_can_be_negative(digits):
    method = build("vid", digits)
    for regressor in method.regressors:
        variance = F.softplus(regressor.log_scale) + 1e-5
        torch.testing.assert_close(variance, torch.full_like(variance, 5.0), rtol=1e-6, atol=0)
    mu = randn(2, 3, 4, 4)
    small = torch.full((3,), math.log(math.expm1(0.01)))  # σ² ≈ 0.01: log σ² < 0 outweighs a perfect fit's 0
    assert vid_loss(mu, mu, small).item() < 0


def test_vid_pairs_stage_ends_at_equal_index_and_its_regressors_map_channels(digits):
    """Student blocks.0 (8 ch, 8×8) with teacher blocks.0 (16 ch, 8×8), blocks.1 (16, 4×4) with blocks.1 (32, 4×4);
    the teacher's blocks.2 is unpaired. μ: three 1×1 convs without bias, mid channels those of the teacher."""
    method = build("vid", digits)
    assert [(p.student, p.teacher) for p in method.pairs] == [("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")]
    convs = [m for m in method.regressors[0].mean if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (8, 16, (1, 1), None), (16, 16, (1, 1), None), (16, 16, (1, 1), None)]
    assert method.exported() is method.student
    assert not any(k.startswith("regressors") for k in method.exported().state_dict())


def test_vid_total_is_ce_plus_weight_times_the_sum_over_pairs_pooling_the_larger_map(digits):
    taps = TapsConfig(student=["blocks.0", "blocks.1"], teacher=["blocks.1", "blocks.1"])
    method = build("vid", digits, taps=taps, weight=2.5)
    x, y = digits.x_train[:8], digits.y_train[:8]
    from kdpipe.taps import forward_with_taps

    student = forward_with_taps(method.student, x, method.student_taps())
    teacher = forward_with_taps(method.teacher, x, method.teacher_taps()).detach()
    total, parts = method.loss(Batch(torch.arange(8), x, y), student, teacher)
    expected = 0.0
    for regressor, (s_tap, t_tap) in zip(method.regressors, [("blocks.0", "blocks.1"), ("blocks.1", "blocks.1")]):
        s = F.adaptive_avg_pool2d(student.features[s_tap], teacher.features[t_tap].shape[2:])
        expected = expected + vid_loss(regressor.mean(s), teacher.features[t_tap], regressor.log_scale)
    torch.testing.assert_close(parts["vid"], expected.detach())
    torch.testing.assert_close(total, F.cross_entropy(student.logits, y) + 2.5 * expected)
    total.backward()
    assert all(r.log_scale.grad is not None for r in method.regressors)  # α is trained (RepDistiller)


def test_pkt_is_ce_plus_weight_times_pkt_on_the_embeddings(digits):
    method = build("pkt", digits, weight=1000.0)
    assert method.pairs == [("pool", "pool")]
    emb_s, emb_t, logits = randn(5, 32, seed=10), randn(5, 64, seed=11), randn(5, 10, seed=12)
    y = torch.randint(0, 10, (5,))
    total, parts = method.loss(Batch(torch.arange(5), torch.zeros(5), y), Outputs(logits, {"pool": emb_s}),
                               Outputs(logits, {"pool": emb_t}))
    torch.testing.assert_close(parts["relation"], 1000.0 * pkt_loss(emb_s, emb_t))
    torch.testing.assert_close(total, F.cross_entropy(logits, y) + 1000.0 * pkt_loss(emb_s, emb_t))


@pytest.mark.parametrize("setting, key", [
    ("distill.params.weight=0", "distill.params.weight"),
    ("distill.params.weight=-1", "distill.params.weight"),
])
@pytest.mark.parametrize("name", ["pkt", "vid"])
def test_bad_settings_exit_2_in_one_line(workdir, name, setting, key):
    result = cli("check", PIPELINES / f"{name}.yaml", *sets(setting))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], lines


def test_vid_on_vectors_exits_2_naming_the_taps(workdir):
    result = cli("check", PIPELINES / "vid.yaml", *sets("distill.taps.student=[pool]", "distill.taps.teacher=[pool]"))
    assert result.exit_code == 2, result.output
    assert "distill.taps" in result.stderr and "feature maps" in result.stderr
