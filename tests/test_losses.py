"""kdpipe.losses against METHODS.md: an independent float64 reference, the "checkable facts", errors, gradients.

The comparisons run the library in float64 so that a mismatch means a wrong
formula, not rounding. Pooling cases use only sizes where each side of the
larger map is an integer multiple of the smaller one's: there adaptive average
pooling is exactly a block mean, which is what the reference computes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_losses as ref
from kdpipe import losses

RTOL = 1e-5


def randn(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def close(actual: torch.Tensor, expected: float) -> None:
    assert actual.ndim == 0
    assert actual.item() == pytest.approx(expected, rel=RTOL, abs=1e-12)


# (student shape, teacher shape): channel counts differ, batches 3/5/16, spatial sizes equal, student
# larger (8×8→4×4, 8×6→4×2), teacher larger (6×6→2×3, 9×3→3×1) — every pooled side an integer factor.
MAP_PAIRS = [
    ((3, 4, 4, 4), (3, 6, 4, 4)),
    ((5, 3, 8, 8), (5, 7, 4, 4)),
    ((5, 2, 8, 6), (5, 4, 4, 2)),
    ((16, 8, 2, 3), (16, 5, 6, 6)),
    ((3, 6, 3, 1), (3, 2, 9, 3)),
]
MAP_IDS = [f"s{'x'.join(map(str, s))}-t{'x'.join(map(str, t))}" for s, t in MAP_PAIRS]

NST_KERNELS = [
    {"kernel": "linear"},
    {"kernel": "polynomial", "degree": 1, "c": 0.0},
    {"kernel": "polynomial", "degree": 2, "c": 0.0},
    {"kernel": "polynomial", "degree": 2, "c": 1.0},
    {"kernel": "polynomial", "degree": 3, "c": 0.5},
    {"kernel": "gaussian", "sigma2": 0.1},
    {"kernel": "gaussian", "sigma2": 1.0},
    {"kernel": "gaussian", "sigma2": 10.0},
]
NST_IDS = ["-".join(f"{k}={v}" for k, v in kw.items()) for kw in NST_KERNELS]


def np_(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


# --- 1. the library equals the reference --------------------------------------------------


@pytest.mark.parametrize("n,c", [(3, 2), (5, 10), (16, 7)])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_kd_loss_matches_reference(n, c, temperature):
    z_s, z_t = randn(n, c, seed=1) * 3, randn(n, c, seed=2) * 3
    close(losses.kd_loss(z_s, z_t, temperature=temperature), ref.kd_loss(np_(z_s), np_(z_t), temperature))


@pytest.mark.parametrize("shape", [(3, 10), (5, 4, 3, 3), (16, 2, 8, 8)])
def test_fitnet_loss_matches_reference(shape):
    s, t = randn(*shape, seed=1), randn(*shape, seed=2)
    close(losses.fitnet_loss(s, t), ref.fitnet_loss(np_(s), np_(t)))


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS, ids=MAP_IDS)
def test_at_loss_matches_reference(s_shape, t_shape, p):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    close(losses.at_loss(s, t, p=p), ref.at_loss(np_(s), np_(t), p))


@pytest.mark.parametrize("kw", NST_KERNELS, ids=NST_IDS)
@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS, ids=MAP_IDS)
def test_nst_loss_matches_reference(s_shape, t_shape, kw):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    close(losses.nst_loss(s, t, **kw), ref.nst_loss(np_(s), np_(t), **kw))


@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("s_shape,t_shape", [((3, 4), (3, 9)), ((5, 2, 3, 3), (5, 6)), ((16, 32), (16, 8))])
def test_rkd_loss_matches_reference(s_shape, t_shape, weights):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    expected = ref.rkd_loss(np_(s), np_(t), *weights)
    close(losses.rkd_loss(s, t, distance_weight=weights[0], angle_weight=weights[1]), expected)


def test_rkd_loss_with_large_distances_uses_the_linear_huber_branch():
    s, t = randn(5, 6, seed=1), randn(5, 6, seed=2)
    s[0] *= 50.0  # one far outlier: normalized student distances differ from the teacher's by more than 1
    assert np.abs(ref.rkd_distances(np_(s)) - ref.rkd_distances(np_(t))).max() > 1.0
    close(losses.rkd_loss(s, t), ref.rkd_loss(np_(s), np_(t)))


@pytest.mark.parametrize("s_shape,t_shape", [((3, 4), (3, 9)), ((5, 2, 3, 3), (5, 6, 2, 2)), ((16, 8, 4, 4), (16, 3, 2, 2))])
def test_sp_loss_matches_reference(s_shape, t_shape):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    close(losses.sp_loss(s, t), ref.sp_loss(np_(s), np_(t)))


@pytest.mark.parametrize("target", ["pairwise", "average"])
@pytest.mark.parametrize("n,c,peers", [(3, 4, 1), (5, 10, 2), (16, 3, 4)])
def test_dml_loss_matches_reference(n, c, peers, target):
    z = randn(n, c, seed=1) * 2
    peer_logits = [randn(n, c, seed=10 + k) * 2 for k in range(peers)]
    expected = ref.dml_loss(np_(z), [np_(p) for p in peer_logits], target)
    close(losses.dml_loss(z, peer_logits, target=target), expected)


@pytest.mark.parametrize("n,c", [(3, 2), (5, 10), (16, 7)])
def test_cwtm_weights_match_reference_and_sum_to_one(n, c):
    z = randn(n, c, seed=1) * 3
    w = losses.cwtm_weights(z)
    assert w.shape == (n,)
    np.testing.assert_allclose(np_(w), ref.cwtm_weights(np_(z)), rtol=RTOL)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)  # fact 7
    assert (w > 0).all()


SCORE_SHAPES = [(3,), (3, 1), (5,), (5, 1), (16,), (16, 1)]


@pytest.mark.parametrize("mode", ["bce", "lsgan"])
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adversarial_losses_match_reference(shape, mode):
    d_t, d_s = randn(*shape, seed=1) * 3, randn(*shape, seed=2) * 3
    close(losses.adversarial_d_loss(d_t, d_s, mode=mode), ref.adversarial_d_loss(np_(d_t), np_(d_s), mode))
    close(losses.adversarial_g_loss(d_s, mode=mode), ref.adversarial_g_loss(np_(d_s), mode))


def test_adversarial_losses_accept_mixed_score_shapes():
    d_t, d_s = randn(5, 1, seed=1), randn(5, seed=2)
    for mode in ("bce", "lsgan"):
        close(losses.adversarial_d_loss(d_t, d_s, mode=mode), ref.adversarial_d_loss(np_(d_t), np_(d_s), mode))


def test_library_is_float32_accurate_too():
    """The default dtype in training is float32: the same formulas hold there to float32 rounding."""
    s, t = randn(5, 3, 8, 8, seed=1), randn(5, 7, 4, 4, seed=2)
    for kw in NST_KERNELS:
        expected = ref.nst_loss(np_(s), np_(t), **kw)
        assert losses.nst_loss(s.float(), t.float(), **kw).item() == pytest.approx(expected, rel=1e-3, abs=1e-6)
    z_s, z_t = randn(16, 10, seed=3), randn(16, 10, seed=4)
    assert losses.kd_loss(z_s.float(), z_t.float()).item() == pytest.approx(ref.kd_loss(np_(z_s), np_(z_t)), rel=1e-4)


# --- 2. METHODS.md's checkable facts ----------------------------------------------------------


def test_fact1_kd_loss_zero_at_equal_logits_and_invariant_to_row_constants():
    z_s, z_t = randn(5, 10, seed=1), randn(5, 10, seed=2)
    assert abs(losses.kd_loss(z_t.clone(), z_t).item()) < 1e-12
    base = losses.kd_loss(z_s, z_t, temperature=3.0).item()
    shift = randn(5, 1, seed=3) * 100  # a different constant per sample
    assert losses.kd_loss(z_s + shift, z_t, temperature=3.0).item() == pytest.approx(base, rel=1e-9)
    assert losses.kd_loss(z_s, z_t + shift, temperature=3.0).item() == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_fact1_kd_gradient_is_T_times_prob_difference_over_N(temperature):
    z_s, z_t = randn(16, 10, seed=1, requires_grad=True), randn(16, 10, seed=2)
    losses.kd_loss(z_s, z_t, temperature=temperature).backward()
    expected = temperature * (F.softmax(z_s.detach() / temperature, 1) - F.softmax(z_t / temperature, 1)) / 16
    torch.testing.assert_close(z_s.grad, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_(z_s.grad), ref.kd_grad(np_(z_s), np_(z_t), temperature), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS, ids=MAP_IDS)
def test_fact2_nst_linear_is_squared_distance_of_mean_channels(s_shape, t_shape):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    closed_form = ref.nst_linear_closed_form(np_(s), np_(t))
    assert ref.nst_loss(np_(s), np_(t), kernel="linear") == pytest.approx(closed_form, rel=1e-10)
    close(losses.nst_loss(s, t, kernel="linear"), closed_form)


@pytest.mark.parametrize("s_shape,t_shape", MAP_PAIRS, ids=MAP_IDS)
def test_fact3_nst_polynomial_2_0_is_gram_matrix_distance(s_shape, t_shape):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    closed_form = ref.nst_gram_closed_form(np_(s), np_(t))
    assert ref.nst_loss(np_(s), np_(t), kernel="polynomial", degree=2, c=0.0) == pytest.approx(closed_form, rel=1e-10)
    close(losses.nst_loss(s, t, kernel="polynomial", degree=2, c=0.0), closed_form)


@pytest.mark.parametrize("kw", NST_KERNELS, ids=NST_IDS)
def test_fact4_nst_nonnegative_and_zero_for_equal_maps(kw):
    for seed in range(5):
        s, t = randn(5, 3, 8, 8, seed=seed), randn(5, 6, 4, 4, seed=seed + 100)
        assert losses.nst_loss(s, t, **kw).item() >= -1e-12
        assert losses.nst_loss(s.float(), t.float(), **kw).item() >= -1e-6
        assert abs(losses.nst_loss(t.clone(), t, **kw).item()) < 1e-12
        assert abs(losses.nst_loss(t.float().clone(), t.float(), **kw).item()) < 1e-6


@pytest.mark.parametrize("a", [0.01, 1.0, 7.5])
def test_fact5_rkd_zero_under_positive_affine_map(a):
    t = randn(6, 12, seed=1)
    b = randn(12, seed=2) * 5  # a shift per dimension
    assert losses.rkd_loss(a * t + b, t).item() == pytest.approx(0.0, abs=1e-9)
    assert losses.rkd_loss(t**3, t).item() > 0.1  # a non-affine map does change the relations


@pytest.mark.parametrize("a", [0.01, 1.0, 7.5])
def test_fact5_sp_zero_under_positive_scaling(a):
    t = randn(6, 3, 4, 4, seed=1)
    assert losses.sp_loss(a * t, t).item() == pytest.approx(0.0, abs=1e-12)
    assert losses.sp_loss(t + 1.0, t).item() > 1e-3  # a shift changes the Gram matrix


@pytest.mark.parametrize("target", ["pairwise", "average"])
def test_fact6_dml_gradient_is_prob_difference_over_N(target):
    z_k = randn(16, 10, seed=1, requires_grad=True)
    peers = [randn(16, 10, seed=2 + i, requires_grad=True) for i in range(3)]
    losses.dml_loss(z_k, peers[:1], target=target).backward()
    p_k, p_l = F.softmax(z_k.detach(), 1), F.softmax(peers[0].detach(), 1)
    torch.testing.assert_close(z_k.grad, (p_k - p_l) / 16, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in peers)  # peers' outputs are detached

    # Several peers: (1/(K−1)) Σ_l (p_k − p_l)/N; the same for the averaged target.
    z_k.grad = None
    losses.dml_loss(z_k, peers, target=target).backward()
    mean_p_l = torch.stack([F.softmax(p.detach(), 1) for p in peers]).mean(0)
    torch.testing.assert_close(z_k.grad, (p_k - mean_p_l) / 16, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in peers)


def test_fact6_dml_peer_parameters_get_no_gradient_from_another_peers_loss():
    torch.manual_seed(0)
    peers = [nn.Linear(6, 4), nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))]
    x = torch.randn(5, 6)
    logits = [net(x) for net in peers]
    losses.dml_loss(logits[0], [logits[1]]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peers[0].parameters())
    assert all(p.grad is None for p in peers[1].parameters())


@pytest.mark.parametrize("n,c", [(3, 2), (5, 4), (16, 10)])
def test_fact7_dkpp_keeps_argmax_and_sorted_probabilities(n, c):
    z = randn(n, c, seed=1) * 3
    p = F.softmax(z, 1)
    for seed in range(3):
        q = losses.dkpp_targets(z, generator=torch.Generator().manual_seed(seed))
        assert q.shape == (n, c)
        torch.testing.assert_close(q.argmax(1), p.argmax(1), rtol=0, atol=0)
        torch.testing.assert_close(q.max(1).values, p.max(1).values, rtol=0, atol=0)
        torch.testing.assert_close(q.sort(1).values, p.sort(1).values, rtol=0, atol=0)


def test_dkpp_reproducible_with_a_seeded_generator_and_actually_permutes():
    z = randn(16, 4, seed=1) * 3
    p = F.softmax(z, 1)
    first = losses.dkpp_targets(z, generator=torch.Generator().manual_seed(7))
    again = losses.dkpp_targets(z, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    outputs = [losses.dkpp_targets(z, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    assert any(not torch.equal(q, p) for q in outputs)
    assert any(not torch.equal(a, b) for a, b in itertools.combinations(outputs, 2))
    # C = 2: the one non-arg-max probability has nowhere to go.
    z2 = randn(5, 2, seed=2)
    torch.testing.assert_close(losses.dkpp_targets(z2, generator=torch.Generator().manual_seed(0)), F.softmax(z2, 1))


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [losses.rkd_loss, losses.sp_loss])
@pytest.mark.parametrize("n", [1, 2])
def test_relational_losses_need_three_samples(loss, n):
    with pytest.raises(ValueError, match="at least 3"):
        loss(randn(n, 4, seed=1), randn(n, 4, seed=2))


def test_bad_arguments_raise_value_error():
    s, t = randn(3, 2, 4, 4, seed=1), randn(3, 2, 4, 4, seed=2)
    with pytest.raises(ValueError, match="unknown kernel"):
        losses.nst_loss(s, t, kernel="rbf")
    for sigma2 in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma2"):
            losses.nst_loss(s, t, kernel="gaussian", sigma2=sigma2)
    d = randn(3, seed=3)
    with pytest.raises(ValueError, match="unknown gan mode"):
        losses.adversarial_d_loss(d, d, mode="wgan")
    with pytest.raises(ValueError, match="unknown gan mode"):
        losses.adversarial_g_loss(d, mode="wgan")
    with pytest.raises(ValueError, match="unknown DML target"):
        losses.dml_loss(randn(3, 4), [randn(3, 4)], target="max")
    with pytest.raises(ValueError, match="at least one peer"):
        losses.dml_loss(randn(3, 4), [])
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_loss(randn(3, 4), randn(3, 4), temperature=0.0)
    with pytest.raises(ValueError, match="equal shapes"):
        losses.fitnet_loss(randn(3, 4), randn(3, 5))
    with pytest.raises(ValueError, match="batch sizes differ"):
        losses.at_loss(randn(3, 2, 4, 4), randn(4, 2, 4, 4))


# --- every loss: a 0-dim tensor, differentiable in the student input -----------------------


def _teacher(like: torch.Tensor, *shape: int, seed: int = 2) -> torch.Tensor:
    return randn(*shape, seed=seed).to(like.dtype)


# Each call gets the student input s (5×3×4×4, requires grad) and builds the other side in s's dtype.
LOSS_CALLS = {
    "kd": lambda s: losses.kd_loss(s.view(5, -1), _teacher(s, 5, 48)),
    "fitnet": lambda s: losses.fitnet_loss(s, _teacher(s, 5, 3, 4, 4)),
    "at": lambda s: losses.at_loss(s, _teacher(s, 5, 6, 2, 2)),
    "nst-linear": lambda s: losses.nst_loss(s, _teacher(s, 5, 6, 8, 8), kernel="linear"),
    "nst-polynomial": lambda s: losses.nst_loss(s, _teacher(s, 5, 6, 8, 8)),
    "nst-gaussian": lambda s: losses.nst_loss(s, _teacher(s, 5, 6, 2, 2), kernel="gaussian"),
    "rkd": lambda s: losses.rkd_loss(s, _teacher(s, 5, 10)),
    "sp": lambda s: losses.sp_loss(s, _teacher(s, 5, 7)),
    "dml-pairwise": lambda s: losses.dml_loss(s.view(5, -1), [_teacher(s, 5, 48)]),
    "dml-average": lambda s: losses.dml_loss(s.view(5, -1), [_teacher(s, 5, 48), _teacher(s, 5, 48, seed=3)], "average"),
    "adv-d-bce": lambda s: losses.adversarial_d_loss(_teacher(s, 5), s.view(5, -1).sum(1), mode="bce"),
    "adv-d-lsgan": lambda s: losses.adversarial_d_loss(_teacher(s, 5, 1), s.view(5, -1).sum(1, keepdim=True)),
    "adv-g-bce": lambda s: losses.adversarial_g_loss(s.view(5, -1).mean(1), mode="bce"),
    "adv-g-lsgan": lambda s: losses.adversarial_g_loss(s.view(5, -1).mean(1, keepdim=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LOSS_CALLS))
def test_loss_is_scalar_and_differentiable_in_student_input(name, dtype):
    student = randn(5, 3, 4, 4, seed=1).to(dtype).requires_grad_(True)
    out = LOSS_CALLS[name](student)
    assert isinstance(out, torch.Tensor) and out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_teacher_side_gets_no_gradient_in_rkd():
    s, t = randn(5, 8, seed=1, requires_grad=True), randn(5, 8, seed=2, requires_grad=True)
    losses.rkd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("loss", [losses.at_loss, losses.nst_loss])
def test_maps_neither_larger_in_both_dimensions_are_refused(loss):
    with pytest.raises(ValueError, match="neither map is larger in both dimensions"):
        loss(torch.randn(4, 3, 8, 2), torch.randn(4, 5, 4, 4))
