"""An independent float64 NumPy reference for kdpipe/losses.py, written from METHODS.md's formulas.

It deliberately shares no code or structure with kdpipe/losses.py: every sum
is an explicit loop (or einsum) over the indices METHODS.md names, distances
are computed as Σ(x − y)² rather than through the ‖x‖² + ‖y‖² − 2xᵀy
expansion, and pooling is an explicit block mean. The block mean equals
adaptive average pooling only when each side of the larger map is an integer
multiple of the smaller one's, so `block_mean_pool` refuses any other size.
Inputs are NumPy arrays (any float dtype); results are Python floats.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of an N×C array."""
    z = _f64(z)
    out = np.empty_like(z)
    for n in range(z.shape[0]):
        e = np.exp(z[n] - z[n].max())
        out[n] = e / e.sum()
    return out


def l2_normalize(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """v / max(‖v‖, eps) for one vector (a zero vector stays zero)."""
    return v / max(math.sqrt(float(np.dot(v, v))), eps)


def block_mean_pool(feat: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Mean over non-overlapping blocks: N×K×H×W → N×K×out_h×out_w, for H, W integer multiples of out_h, out_w."""
    n, k, h, w = feat.shape
    if h % out_h or w % out_w:
        raise ValueError(f"block mean needs integer factors, got {h}×{w} → {out_h}×{out_w}")
    bh, bw = h // out_h, w // out_w
    out = np.zeros((n, k, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = feat[:, :, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].mean(axis=(2, 3))
    return out


def pool_larger_to_smaller(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, t = _f64(s), _f64(t)
    (hs, ws), (ht, wt) = s.shape[2:], t.shape[2:]
    if hs * ws > ht * wt:
        s = block_mean_pool(s, ht, wt)
    elif ht * wt > hs * ws:
        t = block_mean_pool(t, hs, ws)
    return s, t


def smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Huber with δ = 1, mean over all elements."""
    d = np.abs(_f64(a) - _f64(b)).ravel()
    return float(np.mean([0.5 * x * x if x < 1.0 else x - 0.5 for x in d]))


# --- logit-based ------------------------------------------------------------------------------


def kl_batchmean(p_target: np.ndarray, p_model: np.ndarray) -> float:
    """mean_n Σ_c p_target (log p_target − log p_model)."""
    n, c = p_target.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            if p_target[i, j] > 0:
                total += p_target[i, j] * (math.log(p_target[i, j]) - math.log(p_model[i, j]))
    return total / n


def kd_loss(z_s, z_t, temperature: float = 4.0) -> float:
    return temperature**2 * kl_batchmean(softmax(_f64(z_t) / temperature), softmax(_f64(z_s) / temperature))


def kd_grad(z_s, z_t, temperature: float = 4.0) -> np.ndarray:
    """METHODS.md fact 1: ∂kd_loss/∂z_s = T·(p_s^T − p_t^T)/N."""
    n = len(z_s)
    return temperature * (softmax(_f64(z_s) / temperature) - softmax(_f64(z_t) / temperature)) / n


# --- feature-based ----------------------------------------------------------------------------


def fitnet_loss(s, t) -> float:
    return float(np.mean((_f64(s) - _f64(t)) ** 2))


def at_loss(s, t, p: float = 2) -> float:
    s, t = pool_larger_to_smaller(s, t)
    n = s.shape[0]
    total, count = 0.0, 0
    for i in range(n):
        a_s = l2_normalize((np.abs(s[i]) ** p).mean(axis=0).ravel())
        a_t = l2_normalize((np.abs(t[i]) ** p).mean(axis=0).ravel())
        total += float(((a_s - a_t) ** 2).sum())
        count += a_s.size
    return total / count


def nst_kernel(x: np.ndarray, y: np.ndarray, kernel: str, degree: int = 2, c: float = 0.0, sigma2: float = 1.0) -> float:
    if kernel == "linear":
        return float(x @ y)
    if kernel == "polynomial":
        return float((x @ y + c) ** degree)
    if kernel == "gaussian":
        return math.exp(-max(2.0 - 2.0 * float(x @ y), 0.0) / (2.0 * sigma2))
    raise ValueError(kernel)


def nst_channels(feat: np.ndarray) -> list[np.ndarray]:
    """Per sample: K×HW with every channel L2-normalized over its positions (the "neuron selectivity" samples)."""
    n, k = feat.shape[:2]
    out = []
    for i in range(n):
        flat = feat[i].reshape(k, -1)
        out.append(np.stack([l2_normalize(flat[j]) for j in range(k)]))
    return out


def nst_loss(s, t, kernel: str = "polynomial", degree: int = 2, c: float = 0.0, sigma2: float = 1.0) -> float:
    """Biased MMD² with all three terms, as explicit double sums, averaged over N."""
    s, t = pool_larger_to_smaller(s, t)
    total = 0.0
    for t_hat, s_hat in zip(nst_channels(t), nst_channels(s)):
        kt, ks = len(t_hat), len(s_hat)
        k = lambda x, y: nst_kernel(x, y, kernel, degree, c, sigma2)  # noqa: E731
        tt = sum(k(t_hat[i], t_hat[ii]) for i in range(kt) for ii in range(kt))
        ss = sum(k(s_hat[j], s_hat[jj]) for j in range(ks) for jj in range(ks))
        ts = sum(k(t_hat[i], s_hat[j]) for i in range(kt) for j in range(ks))
        total += tt / kt**2 + ss / ks**2 - 2.0 * ts / (kt * ks)
    return total / s.shape[0]


def nst_linear_closed_form(s, t) -> float:
    """METHODS.md fact 2: ‖mean_i t̂_i − mean_j ŝ_j‖² averaged over N."""
    s, t = pool_larger_to_smaller(s, t)
    values = [float(((t_hat.mean(axis=0) - s_hat.mean(axis=0)) ** 2).sum())
              for t_hat, s_hat in zip(nst_channels(t), nst_channels(s))]
    return float(np.mean(values))


def nst_gram_closed_form(s, t) -> float:
    """METHODS.md fact 3: mean over N of ‖T̂ᵀT̂/K_t − ŜᵀŜ/K_s‖_F² (HW×HW Gram matrices)."""
    s, t = pool_larger_to_smaller(s, t)
    values = []
    for t_hat, s_hat in zip(nst_channels(t), nst_channels(s)):
        gram_t = np.einsum("kp,kq->pq", t_hat, t_hat) / len(t_hat)
        gram_s = np.einsum("kp,kq->pq", s_hat, s_hat) / len(s_hat)
        values.append(float(((gram_t - gram_s) ** 2).sum()))
    return float(np.mean(values))


# --- relation-based ---------------------------------------------------------------------------


def rkd_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances (squared clamped at 1e-12, diagonal 0), divided by the mean positive entry."""
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                d[i, j] = math.sqrt(max(float(((x[i] - x[j]) ** 2).sum()), 1e-12))
    return d / d[d > 0].mean()


def rkd_angles(x: np.ndarray) -> np.ndarray:
    """cos[i, j, k] = ⟨normalize(x_i − x_j), normalize(x_k − x_j)⟩ for all N³ triples (0 where i = j or k = j)."""
    n = len(x)
    e = np.zeros((n, n, x.shape[1]))
    for i in range(n):
        for j in range(n):
            e[i, j] = l2_normalize(x[i] - x[j])
    cos = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                cos[i, j, k] = float(e[i, j] @ e[k, j])
    return cos


def rkd_loss(s, t, distance_weight: float = 25.0, angle_weight: float = 50.0) -> float:
    s = _f64(s).reshape(len(s), -1)
    t = _f64(t).reshape(len(t), -1)
    return (distance_weight * smooth_l1(rkd_distances(s), rkd_distances(t))
            + angle_weight * smooth_l1(rkd_angles(s), rkd_angles(t)))


def sp_loss(s, t) -> float:
    def normalized_gram(feat):
        q = _f64(feat).reshape(len(feat), -1)
        g = np.einsum("nd,md->nm", q, q)
        return np.stack([l2_normalize(row) for row in g])

    n = len(s)
    return float(((normalized_gram(t) - normalized_gram(s)) ** 2).sum()) / n**2


# --- collaborative, born-again, adversarial ---------------------------------------------------


def dml_loss(logits, peer_logits, target: str = "pairwise") -> float:
    p_k = softmax(logits)
    peers = [softmax(z) for z in peer_logits]
    if target == "pairwise":
        return sum(kl_batchmean(p_l, p_k) for p_l in peers) / len(peers)
    if target == "average":
        return kl_batchmean(sum(peers) / len(peers), p_k)
    raise ValueError(target)


def cwtm_weights(teacher_logits) -> np.ndarray:
    confidence = softmax(teacher_logits).max(axis=1)
    return confidence / confidence.sum()


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def adversarial_d_loss(d_teacher, d_student, mode: str = "lsgan") -> float:
    d_t, d_s = _f64(d_teacher).ravel(), _f64(d_student).ravel()
    if mode == "bce":  # −mean log σ(d_t) − mean log(1 − σ(d_s)); log(1 − σ(x)) = log σ(−x)
        return -float(np.mean([_log_sigmoid(x) for x in d_t])) - float(np.mean([_log_sigmoid(-x) for x in d_s]))
    if mode == "lsgan":
        return 0.5 * (float(np.mean((d_t - 1.0) ** 2)) + float(np.mean(d_s**2)))
    raise ValueError(mode)


def adversarial_g_loss(d_student, mode: str = "lsgan") -> float:
    d_s = _f64(d_student).ravel()
    if mode == "bce":
        return -float(np.mean([_log_sigmoid(x) for x in d_s]))
    if mode == "lsgan":
        return float(np.mean((d_s - 1.0) ** 2))
    raise ValueError(mode)


# --- dkd, dist, ctkd, logit standardization ---


def dkd_loss(z_s, z_t, target, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> float:
    """TCKD and NCKD per sample from explicit probabilities: b = [p_g, 1 − p_g], p̂ = softmax over c ≠ g."""
    z_s, z_t = _f64(z_s) / temperature, _f64(z_t) / temperature
    n, c = z_s.shape
    tckd = nckd = 0.0
    for i in range(n):
        g = int(target[i])
        p_s, p_t = softmax(z_s[i : i + 1])[0], softmax(z_t[i : i + 1])[0]
        b_s, b_t = [p_s[g], 1.0 - p_s[g]], [p_t[g], 1.0 - p_t[g]]
        tckd += sum(b_t[k] * (math.log(b_t[k]) - math.log(b_s[k])) for k in range(2))
        others = [j for j in range(c) if j != g]
        q_s = softmax(z_s[i : i + 1, others])[0]
        q_t = softmax(z_t[i : i + 1, others])[0]
        nckd += sum(q_t[k] * (math.log(q_t[k]) - math.log(q_s[k])) for k in range(c - 1))
    return temperature**2 * (alpha * tckd + beta * nckd) / n


def pearson(u: np.ndarray, v: np.ndarray) -> float:
    du, dv = u - u.mean(), v - v.mean()
    return float(np.dot(du, dv)) / (math.sqrt(float(np.dot(du, du))) * math.sqrt(float(np.dot(dv, dv))) + 1e-8)


def dist_inter_intra(z_s, z_t, temperature: float = 4.0) -> tuple[float, float]:
    """(inter, intra) of DIST: 1 − mean Pearson of the rows, 1 − mean Pearson of the columns of softmax(z/τ)."""
    y_s, y_t = softmax(_f64(z_s) / temperature), softmax(_f64(z_t) / temperature)
    n, c = y_s.shape
    inter = 1.0 - sum(pearson(y_s[i], y_t[i]) for i in range(n)) / n
    intra = 1.0 - sum(pearson(y_s[:, j], y_t[:, j]) for j in range(c)) / c
    return inter, intra


def dist_loss(z_s, z_t, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0) -> float:
    inter, intra = dist_inter_intra(z_s, z_t, temperature)
    return temperature**2 * (beta * inter + gamma * intra)


def standardize_logits(z, eps: float = 1e-7) -> np.ndarray:
    """Per row (z − mean)/(std + eps), std with divisor C − 1."""
    z = _f64(z)
    out = np.empty_like(z)
    c = z.shape[1]
    for i in range(z.shape[0]):
        mean = sum(z[i]) / c
        std = math.sqrt(sum((x - mean) ** 2 for x in z[i]) / (c - 1))
        out[i] = (z[i] - mean) / (std + eps)
    return out


# --- crd, pkt, vid ---


def crd_nce_loss(probs, n_data: int, eps: float = 1e-7) -> float:
    """−(1/N)[Σ_n log(P_n0/(P_n0 + q + eps)) + Σ_{n,k≥1} log(q/(P_nk + q + eps))], q = K/n_data."""
    p = _f64(probs)
    n, k_plus_1 = p.shape
    q = (k_plus_1 - 1) / n_data
    total = 0.0
    for i in range(n):
        total += math.log(p[i, 0] / (p[i, 0] + q + eps))
        for k in range(1, k_plus_1):
            total += math.log(q / (p[i, k] + q + eps))
    return -total / n


def _pkt_distribution(x, eps: float) -> np.ndarray:
    x = _f64(x).reshape(len(x), -1)
    n = len(x)
    unit = np.zeros_like(x)
    for i in range(n):
        norm = math.sqrt(sum(v * v for v in x[i]))
        unit[i] = x[i] / (norm + eps)
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            s[i, j] = (float(np.dot(unit[i], unit[j])) + 1.0) / 2.0
    for i in range(n):
        s[i] = s[i] / s[i].sum()
    return s


def pkt_loss(student_emb, teacher_emb, eps: float = 1e-7) -> float:
    p_s, p_t = _pkt_distribution(student_emb, eps), _pkt_distribution(teacher_emb, eps)
    n = len(p_s)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps))
    return total / (n * n)


def vid_loss(pred_mean, target, log_scale, eps: float = 1e-5) -> float:
    """mean over N, C, H, W of ½[(μ − t)²/σ²_c + log σ²_c], σ²_c = log(1 + e^α_c) + eps."""
    mu, t, alpha = _f64(pred_mean), _f64(target), _f64(log_scale)
    n, c, h, w = t.shape
    total = 0.0
    for ch in range(c):
        variance = math.log1p(math.exp(alpha[ch])) + eps
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    total += 0.5 * ((mu[i, ch, y, x] - t[i, ch, y, x]) ** 2 / variance + math.log(variance))
    return total / (n * c * h * w)


# --- ReviewKD and OFD ---


def hcl_loss(student_feats, teacher_feats, levels=(4, 2, 1)) -> float:
    """Σ over levels of [MSE + Σ_{kept pools l < H} w_l·MSE(pool_l)] / (1 + Σ w_l), w = 1/2, 1/4, 1/8 over the kept."""
    total = 0.0
    for s, t in zip(student_feats, teacher_feats):
        s, t = _f64(s), _f64(t)
        h = s.shape[2]
        level = float(np.mean((s - t) ** 2))
        weight_sum, w = 1.0, 1.0
        for size in levels:
            if size < h:
                w = w / 2
                diff = block_mean_pool(s, size, size) - block_mean_pool(t, size, size)
                level += w * float(np.mean(diff**2))
                weight_sum += w
        total += level / weight_sum
    return total


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def normal_pdf(x: float) -> float:
    return math.exp(-x * x / 2.0) / math.sqrt(2.0 * math.pi)


def ofd_margin(gamma, beta) -> np.ndarray:
    """Per channel: s = |γ|, m = β; m − s·φ(m/s)/Φ(−m/s) if Φ(−m/s) > 1e-3, else −3s."""
    out = []
    for g, b in zip(_f64(gamma), _f64(beta)):
        s, m = abs(g), b
        tail = normal_cdf(-m / s)
        out.append(m - s * normal_pdf(m / s) / tail if tail > 1e-3 else -3.0 * s)
    return np.array(out)


def ofd_loss(student_feat, teacher_feat, margin) -> float:
    """Σ over elements of (s − max(t, margin_c))² where s > max(t, margin_c) or t > 0, divided by N; the teacher is
    block-mean pooled to the student's H×W first."""
    s, t, margin = _f64(student_feat), _f64(teacher_feat), _f64(margin)
    n, c, h, w = s.shape
    if t.shape[2:] != s.shape[2:]:
        t = block_mean_pool(t, h, w)
    total = 0.0
    for i in range(n):
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    target = max(t[i, k, y, x], margin[k])
                    if s[i, k, y, x] > target or t[i, k, y, x] > 0:
                        total += (s[i, k, y, x] - target) ** 2
    return total / n


# --- MLKD ---


def batch_correlation_loss(student_logits, teacher_logits, temperature: float) -> float:
    """Σ_{i,j} (Σ_c P_t[i,c]·P_t[j,c] − Σ_c P_s[i,c]·P_s[j,c])² / N, P = softmax(z / T)."""
    p_s, p_t = softmax(_f64(student_logits) / temperature), softmax(_f64(teacher_logits) / temperature)
    n, c = p_s.shape
    total = 0.0
    for i in range(n):
        for j in range(n):
            t_ij = sum(p_t[i, k] * p_t[j, k] for k in range(c))
            s_ij = sum(p_s[i, k] * p_s[j, k] for k in range(c))
            total += (t_ij - s_ij) ** 2
    return total / n


def class_correlation_loss(student_logits, teacher_logits, temperature: float) -> float:
    """Σ_{a,b} (Σ_n P_t[n,a]·P_t[n,b] − Σ_n P_s[n,a]·P_s[n,b])² / C, P = softmax(z / T)."""
    p_s, p_t = softmax(_f64(student_logits) / temperature), softmax(_f64(teacher_logits) / temperature)
    n, c = p_s.shape
    total = 0.0
    for a in range(c):
        for b in range(c):
            t_ab = sum(p_t[m, a] * p_t[m, b] for m in range(n))
            s_ab = sum(p_s[m, a] * p_s[m, b] for m in range(n))
            total += (t_ab - s_ab) ** 2
    return total / c
