"""Row kernel of the chunked ATOD loss: one sweep of the vocabulary per row, gradient written in place.

Input: a chunk of R rows of raw student logits ``zs`` (and teacher logits ``zt``) in float32.
Output: per-row loss terms, and — when asked — d(loss)/d(raw student logits) written over ``zs``.
The host does the matmuls; this kernel does everything that is O(R·V) elementwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Row outputs, in the order of the ``out`` buffer's first axis.
OUT_FIELDS = ("loss", "logprobs", "entropy", "distill", "pg", "kl", "clipped")
TEACHER_CODES = {"none": 0, "dense": 1, "sparse": 2}
DIV_CODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


@triton.jit
def _ppo_row(logprob, old, adv, lam, ref, distill, ent, clip_lo, clip_hi, dual_c, kl_coef, ent_coef,
             HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr):
    # r = e^(logprob − old); pg = max(−A·r, −A·clip(r)); dual clip: min(pg, −c·A) for A < 0.
    # d pg/d logprob = −A·r on the unclipped branch, 0 where a clip set the value.
    # k3: δ = ref − logprob, kl = e^δ − δ − 1, d kl/d logprob = 1 − e^δ.
    # ℓ = λ·D + (1 − λ)(pg + c_kl·kl) − c_ent·H and c_lp = dℓ/d logprob (through PPO and k3 only).
    ratio = tl.exp(logprob - old)
    pg_un = -adv * ratio
    pg_cl = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    pg = tl.maximum(pg_un, pg_cl)
    clipped = pg_cl > pg_un
    if HAS_DUAL:
        bound = -dual_c * adv
        dual = (adv < 0) & (bound < pg)
        pg = tl.where(dual, bound, pg)
        clipped = clipped | dual
    g_pg = tl.where(clipped, 0.0, pg_un)
    if HAS_REF:
        delta = ref - logprob
        e_delta = tl.exp(delta)
        kl = e_delta - delta - 1.0
        g_kl = 1.0 - e_delta
    else:
        kl = tl.zeros_like(logprob)
        g_kl = tl.zeros_like(logprob)
    c_lp = (1.0 - lam) * (g_pg + kl_coef * g_kl)
    loss = lam * distill + (1.0 - lam) * (pg + kl_coef * kl) - ent_coef * ent
    return loss, pg, kl, clipped, c_lp


@triton.jit
def _atod_rows_kernel(
    zs_ptr, zt_ptr, stride_zs, stride_zt,
    tgt_ptr, old_ptr, adv_ptr, lam_ptr, ref_ptr, sp_ptr, scale_ptr, out_ptr,
    R, V, inv_t, clip_lo, clip_hi, dual_c, kl_coef, ent_coef, beta, log_beta, log_1mbeta,
    TEACHER: tl.constexpr, DIV: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Pass 1, online over vocab tiles: m = running max, l = Σ e^(z−m); sums kept relative to the running
    # max so that nothing cancels at the scale of the logits (peaked policies have H ≈ 0 at lse ≈ 100):
    #   b = Σ e^(z_s−m_s)(m_s − z_s) ≥ 0, so H = log l_s + b / l_s;
    #   reverse KL: x = Σ e^(z_s−m_s)((z_s−m_s) − (z_t−m_t)), D = x / l_s − log l_s + log l_t;
    #   forward KL: x = Σ e^(z_t−m_t)((z_t−m_t) − (z_s−m_s)), D = x / l_t − log l_t + log l_s.
    # When the maxima grow by (Δ_s, Δ_t) old terms shift: l ← l·e^(−Δ), b ← e^(−Δ_s)(b + Δ_s·l_s),
    # x_rev ← e^(−Δ_s)(x − (Δ_s − Δ_t)·l_s), x_fwd ← e^(−Δ_t)(x − (Δ_t − Δ_s)·l_t).
    # Pass 2 (JSD only): KL(p_t‖m), KL(p_s‖m) with log m = logaddexp(log(1−β) + log p_s, log β + log p_t).
    # Last pass writes dℓ/dz_s · scale, scale = 1 / (normalizer · T):
    #   dℓ/dz_j = −c_lp·p_j + c_ent·p_j(log p_j + H) + c_lp·[j = target] + λ·dD/dz_j with dD/dz_j =
    #   rev p_j(log p_j − log q_j − D) | fwd p_j − q_j | jsd (1−β) p_j(log p_j − log m_j − KL(p‖m)) | sparse S·p_j
    #   (the sparse teacher's −p̂_k at its top-k ids is added by the host).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)

    m_s = tl.full((BLOCK_R,), neg_inf, tl.float32)
    l_s = tl.zeros((BLOCK_R,), tl.float32)
    b_s = tl.zeros((BLOCK_R,), tl.float32)
    m_t = tl.full((BLOCK_R,), neg_inf, tl.float32)
    l_t = tl.zeros((BLOCK_R,), tl.float32)
    x = tl.zeros((BLOCK_R,), tl.float32)
    z_tgt = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        valid = rmask[:, None] & (cols < V)[None, :]
        zs = tl.load(zs_ptr + rows[:, None] * stride_zs + cols[None, :], mask=valid, other=neg_inf) * inv_t
        zs = tl.where(rmask[:, None], zs, 0.0)  # padding rows stay finite
        zs0 = tl.where(valid, zs, 0.0)  # finite copy for products (e = 0 where zs = -inf)
        ms_new = tl.maximum(m_s, tl.max(zs, axis=1))
        d_s = tl.where(l_s > 0, ms_new - m_s, 0.0)
        alpha = tl.exp(m_s - ms_new)
        e_s = tl.exp(zs - ms_new[:, None])
        b_s = alpha * (b_s + d_s * l_s) + tl.sum(e_s * (ms_new[:, None] - zs0), axis=1)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], zs0, 0.0), axis=1)
        if TEACHER == 1:
            zt = tl.load(zt_ptr + rows[:, None] * stride_zt + cols[None, :], mask=valid, other=neg_inf) * inv_t
            zt = tl.where(rmask[:, None], zt, 0.0)
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
            l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
            m_t = mt_new
        l_s = l_s * alpha + tl.sum(e_s, axis=1)
        m_s = ms_new

    log_ls = tl.log(l_s)
    lse_s = m_s + log_ls
    ent = log_ls + b_s / l_s
    logprob = (z_tgt - m_s) - log_ls
    distill = tl.zeros((BLOCK_R,), tl.float32)
    kl_sm = tl.zeros((BLOCK_R,), tl.float32)
    m_t = tl.where(l_t > 0, m_t, 0.0)
    log_lt = tl.log(tl.maximum(l_t, 1e-30))
    s_hat = tl.zeros((BLOCK_R,), tl.float32)
    if TEACHER == 1:
        if DIV == 0:
            distill = x / l_s - log_ls + log_lt
        elif DIV == 1:
            distill = x / l_t - log_lt + log_ls
        else:
            kl_tm = tl.zeros((BLOCK_R,), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                valid = rmask[:, None] & (cols < V)[None, :]
                lps = tl.load(zs_ptr + rows[:, None] * stride_zs + cols[None, :], mask=valid, other=0.0) * inv_t
                lpt = tl.load(zt_ptr + rows[:, None] * stride_zt + cols[None, :], mask=valid, other=0.0) * inv_t
                lps = (lps - m_s[:, None]) - log_ls[:, None]
                lpt = (lpt - m_t[:, None]) - log_lt[:, None]
                a = log_1mbeta + lps
                b = log_beta + lpt
                mx = tl.maximum(a, b)
                logm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                kl_tm += tl.sum(tl.where(valid, tl.exp(lpt) * (lpt - logm), 0.0), axis=1)
                kl_sm += tl.sum(tl.where(valid, tl.exp(lps) * (lps - logm), 0.0), axis=1)
            distill = beta * kl_tm + (1.0 - beta) * kl_sm
    elif TEACHER == 2:
        # sp = (Σ p̂ log p̂, Σ p̂ z_s[id], Σ p̂) over the top-k ids with p̂ > 0.
        s_hat = tl.load(sp_ptr + rows * 3 + 2, mask=rmask, other=0.0)
        distill = (tl.load(sp_ptr + rows * 3, mask=rmask, other=0.0)
                   - tl.load(sp_ptr + rows * 3 + 1, mask=rmask, other=0.0) + s_hat * lse_s)

    old = tl.load(old_ptr + rows, mask=rmask, other=0.0)
    adv = tl.load(adv_ptr + rows, mask=rmask, other=0.0)
    lam = tl.load(lam_ptr + rows, mask=rmask, other=0.0)
    ref = old
    if HAS_REF:
        ref = tl.load(ref_ptr + rows, mask=rmask, other=0.0)
    loss, pg, kl, clipped, c_lp = _ppo_row(logprob, old, adv, lam, ref, distill, ent, clip_lo, clip_hi, dual_c,
                                           kl_coef, ent_coef, HAS_REF, HAS_DUAL)
    tl.store(out_ptr + 0 * R + rows, loss, mask=rmask)
    tl.store(out_ptr + 1 * R + rows, logprob, mask=rmask)
    tl.store(out_ptr + 2 * R + rows, ent, mask=rmask)
    tl.store(out_ptr + 3 * R + rows, distill, mask=rmask)
    tl.store(out_ptr + 4 * R + rows, pg, mask=rmask)
    tl.store(out_ptr + 5 * R + rows, kl, mask=rmask)
    tl.store(out_ptr + 6 * R + rows, clipped.to(tl.float32), mask=rmask)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            valid = rmask[:, None] & (cols < V)[None, :]
            zs = tl.load(zs_ptr + rows[:, None] * stride_zs + cols[None, :], mask=valid, other=0.0) * inv_t
            lps = (zs - m_s[:, None]) - log_ls[:, None]
            p = tl.exp(lps)
            dz = p * (ent_coef * (lps + ent[:, None]) - c_lp[:, None])
            dz += tl.where(cols[None, :] == tgt[:, None], c_lp[:, None], 0.0)
            if TEACHER == 1:
                zt = tl.load(zt_ptr + rows[:, None] * stride_zt + cols[None, :], mask=valid, other=0.0) * inv_t
                lpt = (zt - m_t[:, None]) - log_lt[:, None]
                if DIV == 0:
                    dd = p * (lps - lpt - distill[:, None])
                elif DIV == 1:
                    dd = p - tl.exp(lpt)
                else:
                    a = log_1mbeta + lps
                    b = log_beta + lpt
                    mx = tl.maximum(a, b)
                    logm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                    dd = (1.0 - beta) * p * (lps - logm - kl_sm[:, None])
                dz += lam[:, None] * dd
            elif TEACHER == 2:
                dz += (lam * s_hat)[:, None] * p
            tl.store(zs_ptr + rows[:, None] * stride_zs + cols[None, :], dz * scale, mask=valid)


def atod_rows(zs, zt, tgt, old, adv, lam, ref, sparse_sums, scale, *, teacher, divergence, jsd_beta, temperature,
              clip_eps_low, clip_eps_high, dual_clip, kl_coef, entropy_coef, write_grad):
    """Per-row ATOD terms of a chunk; with ``write_grad`` overwrite ``zs`` with d(loss)/d(zs).

    Shapes: zs, zt ``[R, V]`` float32 raw logits (zt ignored unless ``teacher == "dense"``), row stride 1
    along V; tgt ``[R]`` int64; old, adv, lam, ref ``[R]`` float32; sparse_sums ``[R, 3]`` float32;
    scale ``[1]`` float32 (1 / (normalizer · T)). Returns ``[7, R]`` float32 in the order of ``OUT_FIELDS``.
    """
    r, v = zs.shape
    assert zs.dtype == torch.float32 and zs.stride(1) == 1
    out = torch.empty((len(OUT_FIELDS), r), dtype=torch.float32, device=zs.device)
    if r == 0:
        return out
    interp = zs.device.type != "cuda"
    block_r = min(16, triton.next_power_of_2(r)) if interp else 1
    block_v = min(triton.next_power_of_2(v), 256 if interp else 2048)
    zt_ = zt if teacher == "dense" else zs
    beta = float(jsd_beta)
    _atod_rows_kernel[(triton.cdiv(r, block_r),)](
        zs, zt_, zs.stride(0), zt_.stride(0),
        tgt, old, adv, lam, old if ref is None else ref, old if sparse_sums is None else sparse_sums, scale, out,
        r, v, 1.0 / temperature, 1.0 - clip_eps_low, 1.0 + clip_eps_high,
        0.0 if dual_clip is None else float(dual_clip), float(kl_coef), float(entropy_coef),
        beta, float(torch.tensor(beta).log()), float(torch.tensor(-beta).log1p()),
        TEACHER=TEACHER_CODES[teacher], DIV=DIV_CODES[divergence], HAS_REF=ref is not None,
        HAS_DUAL=dual_clip is not None, WRITE_GRAD=write_grad, BLOCK_R=block_r, BLOCK_V=block_v,
        num_warps=1 if interp else 8,
    )
    return out
