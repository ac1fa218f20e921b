"""Tile-level math shared by the ATOD row kernel (logits in memory) and the fused kernel (logits in registers).

Every function takes a [rows, vocab-tile] block of float32 logits already divided by T
(``-inf`` at columns past V, finite on padding rows) and per-row state vectors.

Online statistics, kept relative to the running maxima so nothing cancels at the scale of the
logits (a peaked policy has H ≈ 0 next to lse ≈ 100): m = running max, l = Σ e^(z−m),
    b = Σ e^(z_s−m_s)(m_s − z_s) ≥ 0                          -> H = log l_s + b / l_s
    (b_t likewise over the dense teacher's logits               -> H_t = log l_t + b_t / l_t)
    reverse KL  x = Σ e^(z_s−m_s)((z_s−m_s) − (z_t−m_t))       -> D = x / l_s − log l_s + log l_t
    forward KL  x = Σ e^(z_t−m_t)((z_t−m_t) − (z_s−m_s))       -> D = x / l_t − log l_t + log l_s
When the maxima grow by (Δ_s, Δ_t) the old terms shift: l ← l·e^(−Δ), b ← e^(−Δ)(b + Δ·l),
x_rev ← e^(−Δ_s)(x − (Δ_s − Δ_t)·l_s), x_fwd ← e^(−Δ_t)(x − (Δ_t − Δ_s)·l_t).
JSD needs log m = logaddexp(log(1−β) + log p_s, log β + log p_t), so a second sweep once lse is known.
"""

import triton
import triton.language as tl


@triton.jit
def stats_update(m_s, l_s, b_s, m_t, l_t, b_t, x, zs, zt, valid, TEACHER: tl.constexpr, DIV: tl.constexpr):
    zs0 = tl.where(valid, zs, 0.0)  # finite copy for products (e = 0 where zs = -inf)
    ms_new = tl.maximum(m_s, tl.max(zs, axis=1))
    d_s = tl.where(l_s > 0, ms_new - m_s, 0.0)
    alpha = tl.exp(m_s - ms_new)
    e_s = tl.exp(zs - ms_new[:, None])
    b_s = alpha * (b_s + d_s * l_s) + tl.sum(e_s * (ms_new[:, None] - zs0), axis=1)
    if TEACHER == 1:
        zt0 = tl.where(valid, zt, 0.0)
        mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
        d_t = tl.where(l_t > 0, mt_new - m_t, 0.0)
        alpha_t = tl.exp(m_t - mt_new)
        e_t = tl.exp(zt - mt_new[:, None])
        gap = (zs0 - ms_new[:, None]) - (zt0 - mt_new[:, None])
        if DIV == 0:
            x = alpha * (x - (d_s - d_t) * l_s) + tl.sum(e_s * gap, axis=1)
        if DIV == 1:
            x = alpha_t * (x - (d_t - d_s) * l_t) - tl.sum(e_t * gap, axis=1)
        b_t = alpha_t * (b_t + d_t * l_t) + tl.sum(e_t * (mt_new[:, None] - zt0), axis=1)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        m_t = mt_new
    l_s = l_s * alpha + tl.sum(e_s, axis=1)
    return ms_new, l_s, b_s, m_t, l_t, b_t, x


@triton.jit
def stats_finish(m_s, l_s, b_s, m_t, l_t, b_t, x, TEACHER: tl.constexpr, DIV: tl.constexpr):
    """-> (log l_s, entropy, D for reverse/forward KL (else 0), m_t, log l_t, the dense teacher's entropy
    (else 0))"""
    log_ls = tl.log(l_s)
    ent = log_ls + b_s / l_s
    m_t = tl.where(l_t > 0, m_t, 0.0)
    log_lt = tl.log(tl.maximum(l_t, 1e-30))
    distill = tl.zeros_like(ent)
    ent_t = tl.zeros_like(ent)
    if TEACHER == 1:
        ent_t = log_lt + b_t / tl.maximum(l_t, 1e-30)
        if DIV == 0:
            distill = x / l_s - log_ls + log_lt
        elif DIV == 1:
            distill = x / l_t - log_lt + log_ls
    return log_ls, ent, distill, m_t, log_lt, ent_t


@triton.jit
def _log_mix(lps, lpt, log_beta, log_1mbeta):
    a = log_1mbeta + lps
    b = log_beta + lpt
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def jsd_tile(zs, zt, valid, m_s, log_ls, m_t, log_lt, log_beta, log_1mbeta):
    """Row sums of p_t (log p_t − log m) and p_s (log p_s − log m) over the tile."""
    lps = (tl.where(valid, zs, 0.0) - m_s[:, None]) - log_ls[:, None]
    lpt = (tl.where(valid, zt, 0.0) - m_t[:, None]) - log_lt[:, None]
    logm = _log_mix(lps, lpt, log_beta, log_1mbeta)
    kl_tm = tl.sum(tl.where(valid, tl.exp(lpt) * (lpt - logm), 0.0), axis=1)
    kl_sm = tl.sum(tl.where(valid, tl.exp(lps) * (lps - logm), 0.0), axis=1)
    return kl_tm, kl_sm


@triton.jit
def grad_tile(zs, zt, valid, cols, tgt, m_s, log_ls, ent, c_lp, lam, distill, kl_sm, m_t, log_lt, s_hat,
              ent_coef, beta, log_beta, log_1mbeta, TEACHER: tl.constexpr, DIV: tl.constexpr):
    """dℓ/dz_s on the tile (before the 1/(normalizer·T) scale), 0 outside ``valid``:
    −c_lp·p + c_ent·p(log p + H) + c_lp·[j = target] + λ·dD/dz with dD/dz =
    rev p(log p − log q − D) | fwd p − q | jsd (1−β) p(log p − log m − KL(p‖m)) | sparse S·p
    (a sparse teacher's −p̂_k at its ids is added by the caller)."""
    lps = (tl.where(valid, zs, 0.0) - m_s[:, None]) - log_ls[:, None]
    p = tl.exp(lps)
    dz = p * (ent_coef * (lps + ent[:, None]) - c_lp[:, None])
    dz += tl.where(cols[None, :] == tgt[:, None], c_lp[:, None], 0.0)
    if TEACHER == 1:
        lpt = (tl.where(valid, zt, 0.0) - m_t[:, None]) - log_lt[:, None]
        if DIV == 0:
            dd = p * (lps - lpt - distill[:, None])
        elif DIV == 1:
            dd = p - tl.exp(lpt)
        else:
            logm = _log_mix(lps, lpt, log_beta, log_1mbeta)
            dd = (1.0 - beta) * p * (lps - logm - kl_sm[:, None])
        dz += lam[:, None] * dd
    elif TEACHER == 2:
        dz += (lam * s_hat)[:, None] * p
    return tl.where(valid, dz, 0.0)


def jsd_constants(beta: float):
    """(β, log β, log(1 − β)) as kernel arguments (read only by JSD, whose β is inside (0, 1);
    any β in [0, 1] gets valid, possibly infinite, constants)."""
    import math

    beta = float(beta)
    return beta, math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf



