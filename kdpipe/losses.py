"""The distillation losses as pure functions, exactly as METHODS.md states them.

Each returns a 0-dim tensor and is differentiable in the student's inputs.
They are public API: `from kdpipe.losses import nst_loss` works in any loop.
Shapes: logits N×C; feature maps N×K×H×W (channel counts may differ between
student and teacher where the formula allows it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "kd_loss", "fitnet_loss", "at_loss", "nst_loss", "rkd_loss", "sp_loss", "dml_loss",
    "cwtm_weights", "dkpp_targets", "adversarial_d_loss", "adversarial_g_loss", "standardize_logits",
    "dkd_loss", "dist_loss", "grad_reverse", "crd_nce_loss", "pkt_loss", "vid_loss", "hcl_loss", "ofd_loss",
    "ofd_margin", "batch_correlation_loss", "class_correlation_loss",
]

KERNELS = ("linear", "polynomial", "gaussian")
GAN_MODES = ("bce", "lsgan")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float | torch.Tensor = 4.0) -> torch.Tensor:
    """Hinton KD: T² · mean_n Σ_c p_t^T (log p_t^T − log p_s^T), i.e. T²·KL(p_t^T ‖ p_s^T) with "batchmean".

    The T² factor keeps the gradient's scale comparable across temperatures:
    ∂/∂z_s = T·(p_s^T − p_t^T)/N. A 0-dim tensor T (CTKD's learned τ) is not checked: that would wait for the device.
    """
    if not torch.is_tensor(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def fitnet_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint: mean over all elements of (regressed student feature − teacher feature)²."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"fitnet_loss needs equal shapes after the regressor, got {tuple(student_feat.shape)} "
                         f"and {tuple(teacher_feat.shape)}")
    return (student_feat - teacher_feat).pow(2).mean()


def _pool_to_smaller(student_feat: torch.Tensor, teacher_feat: torch.Tensor, name: str):
    """Adaptive-average-pool the map with the larger H×W to the smaller one's H×W."""
    if student_feat.ndim != 4 or teacher_feat.ndim != 4:
        raise ValueError(f"{name} needs N×K×H×W feature maps, got {tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}")
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"{name}: batch sizes differ ({student_feat.shape[0]} vs {teacher_feat.shape[0]})")
    hs, ws = student_feat.shape[2:]
    ht, wt = teacher_feat.shape[2:]
    if (hs, ws) == (ht, wt):
        return student_feat, teacher_feat
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(student_feat, (ht, wt)), teacher_feat
    if hs <= ht and ws <= wt:
        return student_feat, F.adaptive_avg_pool2d(teacher_feat, (hs, ws))
    # Pooling only shrinks: a map taller but narrower than the other has no common smaller size.
    raise ValueError(f"{name}: neither map is larger in both dimensions ({hs}×{ws} vs {ht}×{wt}); cannot pool one to the other")


def _attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis): a(F) = normalize(mean_c |F|^p, flattened) per sample;
    loss = mean over N and positions of (a(F_s) − a(F_t))². The larger map is pooled to the smaller H×W.
    (|F|^p equals F^p for the default p = 2.)
    """
    student_feat, teacher_feat = _pool_to_smaller(student_feat, teacher_feat, "at_loss")
    return (_attention_map(student_feat, p) - _attention_map(teacher_feat, p)).pow(2).mean()


def _kernel(x: torch.Tensor, y: torch.Tensor, kernel: str, degree: int, c: float, sigma2: float) -> torch.Tensor:
    """k(x_i, y_j) for every pair: x is N×A×D, y is N×B×D (rows unit-norm), result N×A×B."""
    dot = torch.bmm(x, y.transpose(1, 2))
    if kernel == "linear":
        return dot
    if kernel == "polynomial":
        return (dot + c).pow(degree)
    # ‖x − y‖² = 2 − 2xᵀy for unit vectors; clamped at 0 against rounding.
    return torch.exp(-(2.0 - 2.0 * dot).clamp(min=0.0) / (2.0 * sigma2))


def nst_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, kernel: str = "polynomial", degree: int = 2,
             c: float = 0.0, sigma2: float = 1.0) -> torch.Tensor:
    """Neuron Selectivity Transfer (Huang & Wang 2017): biased MMD² between channel distributions.

    Each channel, L2-normalized over its H×W positions, is one sample; per batch item
    MMD² = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') − 2·mean_{i,j} k(t_i, s_j),
    averaged over N. Kernels: linear xᵀy; polynomial (xᵀy + c)^degree; gaussian
    exp(−‖x − y‖²/(2·sigma2)). Channel counts may differ; the larger map is pooled
    to the smaller H×W.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}'; expected one of {', '.join(KERNELS)}")
    if kernel == "gaussian" and sigma2 <= 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    student_feat, teacher_feat = _pool_to_smaller(student_feat, teacher_feat, "nst_loss")
    s = F.normalize(student_feat.flatten(2), dim=2, eps=1e-12)
    t = F.normalize(teacher_feat.flatten(2), dim=2, eps=1e-12)
    if kernel == "linear":  # the three terms collapse to ‖mean_i t_i − mean_j s_j‖²
        return (t.mean(dim=1) - s.mean(dim=1)).pow(2).sum(dim=1).mean()
    k_tt = _kernel(t, t, kernel, degree, c, sigma2).mean(dim=(1, 2))
    k_ss = _kernel(s, s, kernel, degree, c, sigma2).mean(dim=(1, 2))
    k_ts = _kernel(t, s, kernel, degree, c, sigma2).mean(dim=(1, 2))
    return (k_tt + k_ss - 2.0 * k_ts).mean()


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    sq = x.pow(2).sum(dim=1)
    squared = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp(min=1e-12)
    off_diagonal = 1.0 - torch.eye(len(x), device=x.device, dtype=x.dtype)
    return squared.sqrt() * off_diagonal


def _normalized_distances(x: torch.Tensor) -> torch.Tensor:
    dist = _pairwise_distances(x)
    return dist / dist[dist > 0].mean()


def _angles(x: torch.Tensor) -> torch.Tensor:
    """cos∠(x_i, x_j, x_k) = ⟨e_ij, e_kj⟩ with e_ij = normalize(x_i − x_j), for all N³ triples."""
    e = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # e[j, i] = normalize(x_i − x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al. 2019): distance_weight·smooth-L1(ψ_D) + angle_weight·smooth-L1(ψ_A).

    ψ_D: pairwise Euclidean distances, each matrix divided by the mean of its positive
    entries. ψ_A: cosines of the angle at x_j for every triple (i, j, k). Both smooth-L1
    (δ = 1) are means; the teacher side carries no gradient.
    """
    s = student_emb.flatten(1)
    t = teacher_emb.flatten(1).detach()
    if s.shape[0] < 3:
        raise ValueError(f"rkd_loss needs a batch of at least 3 samples, got {s.shape[0]}")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd_loss: batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
    loss = s.new_zeros(())
    if distance_weight:
        with torch.no_grad():
            d_t = _normalized_distances(t)
        loss = loss + distance_weight * F.smooth_l1_loss(_normalized_distances(s), d_t, beta=1.0)
    if angle_weight:
        with torch.no_grad():
            a_t = _angles(t)
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), a_t, beta=1.0)
    return loss


def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ‖G̃_t − G̃_s‖_F² / N² with G = QQᵀ, rows L2-normalized."""
    q_s, q_t = student_feat.flatten(1), teacher_feat.flatten(1)
    n = q_s.shape[0]
    if n < 3:
        raise ValueError(f"sp_loss needs a batch of at least 3 samples, got {n}")
    if q_t.shape[0] != n:
        raise ValueError(f"sp_loss: batch sizes differ ({n} vs {q_t.shape[0]})")
    g_s = F.normalize(q_s @ q_s.T, dim=1)
    g_t = F.normalize(q_t @ q_t.T, dim=1)
    return (g_t - g_s).pow(2).sum() / n**2


def dml_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], target: str = "pairwise") -> torch.Tensor:
    """Deep Mutual Learning's mimicry term for one network k (T = 1, peers detached, "batchmean"):
    pairwise: (1/(K−1)) Σ_{l≠k} KL(p_l ‖ p_k); average: KL(mean_{l≠k} p_l ‖ p_k).
    """
    if len(peer_logits) == 0:
        raise ValueError("dml_loss needs at least one peer")
    log_p = F.log_softmax(logits, dim=1)
    if target == "pairwise":
        terms = [F.kl_div(log_p, F.log_softmax(z.detach(), dim=1), reduction="batchmean", log_target=True)
                 for z in peer_logits]
        return torch.stack(terms).mean()
    if target == "average":
        mean_p = torch.stack([F.softmax(z.detach(), dim=1) for z in peer_logits]).mean(dim=0)
        return F.kl_div(log_p, mean_p, reduction="batchmean")
    raise ValueError(f"unknown DML target '{target}'; expected pairwise or average")


def cwtm_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Born-Again CWTM weights: w_n = max_c p_{n,c} / Σ_m max_c p_{m,c} (sum to 1 over the batch)."""
    confidence = F.softmax(teacher_logits.detach(), dim=1).max(dim=1).values
    return confidence / confidence.sum()


def dkpp_targets(teacher_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Born-Again DKPP targets: the teacher's softmax with its arg-max entry kept in place and the other
    C − 1 probabilities permuted at random among the non-arg-max positions, per sample.
    """
    p = F.softmax(teacher_logits.detach(), dim=1)
    n, c = p.shape
    top = p.argmax(dim=1, keepdim=True)
    positions = torch.arange(c, device=p.device).expand(n, c)
    # The non-arg-max positions of every row, in order: N×(C−1).
    others = positions[positions != top].view(n, c - 1)
    keys = torch.rand(n, c - 1, generator=generator, device="cpu").to(p.device)
    shuffled = p.gather(1, others).gather(1, keys.argsort(dim=1))
    return p.scatter(1, others, shuffled)


def adversarial_d_loss(d_teacher: torch.Tensor, d_student: torch.Tensor, mode: str = "lsgan") -> torch.Tensor:
    """Discriminator loss on source scores. bce: BCE(d_t, 1) + BCE(d_s, 0); lsgan: ½[mean (d_t − 1)² + mean d_s²]."""
    d_teacher, d_student = d_teacher.reshape(-1), d_student.reshape(-1)
    if mode == "bce":
        return (F.binary_cross_entropy_with_logits(d_teacher, torch.ones_like(d_teacher))
                + F.binary_cross_entropy_with_logits(d_student, torch.zeros_like(d_student)))
    if mode == "lsgan":
        return 0.5 * ((d_teacher - 1.0).pow(2).mean() + d_student.pow(2).mean())
    raise ValueError(f"unknown gan mode '{mode}'; expected one of {', '.join(GAN_MODES)}")


def adversarial_g_loss(d_student: torch.Tensor, mode: str = "lsgan") -> torch.Tensor:
    """The student's (generator's) loss: bce: BCE(D(z_s), 1); lsgan: mean (D(z_s) − 1)²."""
    d_student = d_student.reshape(-1)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(d_student, torch.ones_like(d_student))
    if mode == "lsgan":
        return (d_student - 1.0).pow(2).mean()
    raise ValueError(f"unknown gan mode '{mode}'; expected one of {', '.join(GAN_MODES)}")


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al. 2024): each row's (z − mean_c z) / (std_c z + eps), std with Bessel's
    correction (divisor C − 1, as the reference computes it). Invariant to a·z + b per row (a > 0); a constant row
    maps to 0, not NaN."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + eps)


# --- DKD, DIST, CTKD ---

# DKD's mask: z_g/T − 1000 makes exp underflow to 0, so p̂ puts no mass and no gradient on the target class; finite,
# because −inf would give kl_div 0·∞ = NaN (METHODS.md, "DKD").
DKD_TARGET_MASK = 1000.0


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float | torch.Tensor = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha·TCKD + beta·NCKD, each T²·"batchmean" KL.

    TCKD compares the binary split b = [p_g, 1 − p_g] of p = softmax(z/T); NCKD the softmax p̂ over the classes
    c ≠ g. log b comes from log-sum-exp (log p_g = z_g/T − LSE(z/T), log(1 − p_g) = LSE_{c≠g}(z/T) − LSE(z/T)), never
    from the log of a sum of probabilities, which reaches log 0 in low precision. A 0-dim tensor T (CTKD's learned
    τ) is not checked: that would wait for the device.
    """
    if not torch.is_tensor(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits / temperature, teacher_logits / temperature
    is_target = F.one_hot(target, s.shape[1]).to(s.dtype)
    n = s.shape[0]

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=1)
        target_logit = z.gather(1, target[:, None]).squeeze(1)
        others_lse = torch.logsumexp(z - DKD_TARGET_MASK * is_target, dim=1)
        return torch.stack([target_logit - lse, others_lse - lse], dim=1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(t), reduction="sum", log_target=True) / n
    log_p_hat_s = F.log_softmax(s - DKD_TARGET_MASK * is_target, dim=1)
    log_p_hat_t = F.log_softmax(t - DKD_TARGET_MASK * is_target, dim=1)
    nckd = F.kl_div(log_p_hat_s, log_p_hat_t, reduction="sum", log_target=True) / n
    return temperature**2 * (alpha * tckd + beta * nckd)


def _mean_pearson(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ρ(u_n, v_n) = ⟨u − ū, v − v̄⟩ / (‖u − ū‖·‖v − v̄‖ + 1e-8)."""
    u = u - u.mean(dim=1, keepdim=True)
    v = v - v.mean(dim=1, keepdim=True)
    return ((u * v).sum(dim=1) / (u.norm(dim=1) * v.norm(dim=1) + 1e-8)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 2.0, gamma: float = 2.0,
              temperature: float = 4.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): τ²·(beta·inter + gamma·intra) on Y = softmax(z/τ), inter = 1 − mean Pearson
    correlation of the rows (samples), intra = 1 − mean Pearson correlation of the columns (classes).

    Dense outputs N×C×H×W are reshaped to (N·H·W)×C. The intra term is a statistic of the batch: at least 2 rows.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = student_logits.shape[1]
    student_logits = student_logits.movedim(1, -1).reshape(-1, classes)
    teacher_logits = teacher_logits.movedim(1, -1).reshape(-1, classes)
    if student_logits.shape[0] < 2:
        raise ValueError("dist_loss correlates each class over the batch (the intra term) and needs at least 2 "
                         f"samples, got {student_logits.shape[0]}")
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1.0 - _mean_pearson(y_s, y_t)
    intra = 1.0 - _mean_pearson(y_s.T, y_t.T)
    return temperature**2 * (beta * inter + gamma * intra)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float) -> torch.Tensor:
    """Gradient reversal (CTKD): the identity forward; backward multiplies the upstream gradient by −lambd."""
    return _GradReverse.apply(x, float(lambd))


# --- CRD, PKT, VID ---


def crd_nce_loss(probs: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss for one side (Tian et al. 2020). `probs`: N×(K+1) normalized scores P = exp(m·v/τ)/Z, the
    positive first, then K negatives drawn from a uniform noise over `n_data` samples (q = K/n_data):
    −(1/N)[Σ_n log(P_n0/(P_n0 + q + eps)) + Σ_{n,k≥1} log(q/(P_nk + q + eps))]."""
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"crd_nce_loss needs N×(K+1) scores with K ≥ 1, got {tuple(probs.shape)}")
    q = (probs.shape[1] - 1) / n_data
    positive, negatives = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(positive / (positive + q + eps))
    log_d0 = torch.log(q / (negatives + q + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def _unit_rows_or_zero(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    return torch.nan_to_num(x, nan=0.0)


def _cosine_distribution(x: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional distribution: S = (x̂x̂ᵀ + 1)/2, diagonal kept, each row divided by its sum."""
    x = _unit_rows_or_zero(x.flatten(1), eps)
    similarity = (x @ x.T + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): mean over the N² entries of
    P_t·log((P_t + eps)/(P_s + eps)), P the cosine-similarity distribution of the batch (RepDistiller's form)."""
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"pkt_loss: batch sizes differ ({student_emb.shape[0]} vs {teacher_emb.shape[0]})")
    p_s = _cosine_distribution(student_emb, eps)
    p_t = _cosine_distribution(teacher_emb, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def vid_loss(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn et al. 2019): the Gaussian negative log-likelihood
    mean over N, C, H, W of ½[(μ − t)²/σ²_c + log σ²_c], without its constant (so it may be negative).

    `log_scale` is α, one value per teacher channel (RepDistiller's name): σ²_c = softplus(α_c) + eps, which keeps
    the variance positive. `pred_mean` μ is the regressed student map, shaped as `target` (N×C×H×W or N×C).
    """
    if pred_mean.shape != target.shape:
        raise ValueError(f"vid_loss needs μ shaped as the target, got {tuple(pred_mean.shape)} and "
                         f"{tuple(target.shape)}")
    if log_scale.shape != (target.shape[1],):
        raise ValueError(f"vid_loss needs one log_scale per target channel ({target.shape[1]}), got "
                         f"{tuple(log_scale.shape)}")
    variance = (F.softplus(log_scale) + eps).view(1, -1, *([1] * (target.ndim - 2)))
    return (0.5 * ((pred_mean - target).pow(2) / variance + torch.log(variance))).mean()


# --- ReviewKD, OFD ---


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """ReviewKD's hierarchical context loss, summed over the paired maps (N×C×H×W, equal shapes): per pair,
    MSE plus, for each pool size l < H, w·MSE of both maps average-pooled to l×l with w = 0.5, 0.25, 0.125 over the
    pools kept, divided by 1 + Σw."""
    total = student_feats[0].new_zeros(())
    for student, teacher in zip(student_feats, teacher_feats, strict=True):
        level_loss, weight, weights = F.mse_loss(student, teacher), 1.0, 1.0
        for size in levels:
            if size >= student.shape[2]:
                continue
            weight /= 2
            level_loss = level_loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size),
                                                          F.adaptive_avg_pool2d(teacher, size))
            weights += weight
        total = total + level_loss / weights
    return total


OFD_TAIL = 1e-3  # below this probability of a negative pre-ReLU value, the margin is −3s (the reference)


def ofd_margin(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """OFD's per-channel margin from the BatchNorm before the ReLU, taking its output as N(m, s²) with s = |γ|,
    m = β: the expected value of the negative part, m − s·φ(m/s)/Φ(−m/s), or −3s where Φ(−m/s) ≤ 1e-3."""
    scale, mean = bn.weight.detach().abs().double(), bn.bias.detach().double()
    normal = torch.distributions.Normal(torch.zeros_like(scale), torch.ones_like(scale))
    tail = normal.cdf(-mean / scale)
    expected_negative = mean - scale * normal.log_prob(mean / scale).exp() / tail
    return torch.where(tail > OFD_TAIL, expected_negative, -3 * scale).float()


def ofd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 (student_feat has passed the connector; margin per teacher channel): with t̃ = max(t, margin),
    Σ (ŝ − t̃)² over the elements where ŝ > t̃ or t > 0, divided by N. The teacher map is average-pooled to the
    student's H×W."""
    if teacher_feat.shape[2:] != student_feat.shape[2:]:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, student_feat.shape[2:])
    target = torch.maximum(teacher_feat, margin.reshape(1, -1, 1, 1).to(teacher_feat.dtype))
    counted = (student_feat > target) | (teacher_feat > 0)
    return ((student_feat - target).pow(2) * counted).sum() / student_feat.shape[0]


# --- MLKD ---


def batch_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """MLKD's batch-level term: with P = softmax(z / T) (N×C), ‖P_t·P_tᵀ − P_s·P_sᵀ‖_F² / N (no T²)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / p_s.shape[0]


def class_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
                           classes: torch.Tensor | None = None) -> torch.Tensor:
    """MLKD's class-level term: with P = softmax(z / T) (N×C), ‖P_tᵀ·P_t − P_sᵀ·P_s‖_F² / C (no T²).

    `classes` (a boolean mask over C): the term over those classes' columns of P alone, divided by their count (the
    softmax still spans every class)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    if classes is not None:
        p_s, p_t = p_s[:, classes], p_t[:, classes]
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / p_s.shape[1]
