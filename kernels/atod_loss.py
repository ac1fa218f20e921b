"""Row kernel of the chunked ATOD loss: one sweep of the vocabulary per row, gradient written in place.

Input: a chunk of R rows of raw student logits ``zs`` (and teacher logits ``zt``) in float32.
Output: per-row loss terms, and — when asked — d(loss)/d(raw student logits) written over ``zs``.
The host does the matmuls; this kernel does everything that is O(R·V) elementwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codes import DIV_CODES, OUT_FIELDS, TEACHER_CODES
from .softmax_tiles import grad_tile, jsd_constants, jsd_tile, stats_finish, stats_update


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
    tgt_ptr, old_ptr, adv_ptr, lam_ptr, ref_ptr, sp_ptr, tlp_ptr, scale_ptr, out_ptr,
    R, V, inv_t, clip_lo, clip_hi, dual_c, kl_coef, ent_coef, beta, log_beta, log_1mbeta,
    TEACHER: tl.constexpr, DIV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_DUAL: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Pass 1: online softmax statistics of both models (softmax_tiles.stats_update).
    # Pass 2 (JSD only): KL(p_t‖m) and KL(p_s‖m) now that both log-sum-exps are known.
    # PPO, k3 and the λ mix per row (_ppo_row), a sampled teacher's D (TEACHER 3) entering through c_lp;
    # last pass writes dℓ/dz_s · scale over zs, with scale = 1 / (normalizer · T)
    # (softmax_tiles.grad_tile; the host adds a sparse teacher's −p̂_k).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows = rows.to(tl.int64)  # row · stride passes 2^31 for large chunks
    cols0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)

    m_s = tl.full((BLOCK_R,), neg_inf, tl.float32)
    l_s = tl.zeros((BLOCK_R,), tl.float32)
    b_s = tl.zeros((BLOCK_R,), tl.float32)
    m_t = tl.full((BLOCK_R,), neg_inf, tl.float32)
    l_t = tl.zeros((BLOCK_R,), tl.float32)
    b_t = tl.zeros((BLOCK_R,), tl.float32)
    x = tl.zeros((BLOCK_R,), tl.float32)
    z_tgt = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        valid = rmask[:, None] & (cols < V)[None, :]
        zs = tl.load(zs_ptr + rows[:, None] * stride_zs + cols[None, :], mask=valid, other=neg_inf) * inv_t
        zs = tl.where(rmask[:, None], zs, 0.0)  # padding rows stay finite
        zt = zs
        if TEACHER == 1:
            zt = tl.load(zt_ptr + rows[:, None] * stride_zt + cols[None, :], mask=valid, other=neg_inf) * inv_t
            zt = tl.where(rmask[:, None], zt, 0.0)
        z_tgt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & valid, zs, 0.0), axis=1)
        m_s, l_s, b_s, m_t, l_t, b_t, x = stats_update(m_s, l_s, b_s, m_t, l_t, b_t, x, zs, zt, valid, TEACHER, DIV)
    log_ls, ent, distill, m_t, log_lt, ent_t = stats_finish(m_s, l_s, b_s, m_t, l_t, b_t, x, TEACHER, DIV)
    logprob = (z_tgt - m_s) - log_ls
    kl_sm = tl.zeros((BLOCK_R,), tl.float32)
    s_hat = tl.zeros((BLOCK_R,), tl.float32)
    if TEACHER == 1:
        if DIV == 2:
            kl_tm = tl.zeros((BLOCK_R,), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                valid = rmask[:, None] & (cols < V)[None, :]
                zs = tl.load(zs_ptr + rows[:, None] * stride_zs + cols[None, :], mask=valid, other=0.0) * inv_t
                zt = tl.load(zt_ptr + rows[:, None] * stride_zt + cols[None, :], mask=valid, other=0.0) * inv_t
                d_tm, d_sm = jsd_tile(zs, zt, valid, m_s, log_ls, m_t, log_lt, log_beta, log_1mbeta)
                kl_tm += d_tm
                kl_sm += d_sm
            distill = beta * kl_tm + (1.0 - beta) * kl_sm
    elif TEACHER == 2:
        # sp = (Σ p̂ log p̂, Σ p̂ z_s[id], Σ p̂) over the top-k ids with p̂ > 0.
        s_hat = tl.load(sp_ptr + rows * 3 + 2, mask=rmask, other=0.0)
        plogp = tl.load(sp_ptr + rows * 3, mask=rmask, other=0.0)
        distill = plogp - tl.load(sp_ptr + rows * 3 + 1, mask=rmask, other=0.0) + s_hat * (m_s + log_ls)
        ent_t = -plogp

    old = logprob  # no old log-probs: the current ones, detached (ratio 1)
    if HAS_OLD:
        old = tl.load(old_ptr + rows, mask=rmask, other=0.0)
    if TEACHER == 3:
        # Sampled teacher: D = −(t − o)·e^(lp − o), dD/d lp = D; its surprisal −t stands in for H_t.
        t_lp = tl.load(tlp_ptr + rows, mask=rmask, other=0.0)
        distill = -(t_lp - old) * tl.exp(logprob - old)
        ent_t = -t_lp
    adv = tl.load(adv_ptr + rows, mask=rmask, other=0.0)
    lam = tl.load(lam_ptr + rows, mask=rmask, other=0.0)
    ref = old
    if HAS_REF:
        ref = tl.load(ref_ptr + rows, mask=rmask, other=0.0)
    loss, pg, kl, clipped, c_lp = _ppo_row(logprob, old, adv, lam, ref, distill, ent, clip_lo, clip_hi, dual_c,
                                           kl_coef, ent_coef, HAS_REF, HAS_DUAL)
    if TEACHER == 3:
        c_lp += lam * distill
    tl.store(out_ptr + 0 * R + rows, loss, mask=rmask)
    tl.store(out_ptr + 1 * R + rows, logprob, mask=rmask)
    tl.store(out_ptr + 2 * R + rows, ent, mask=rmask)
    tl.store(out_ptr + 3 * R + rows, distill, mask=rmask)
    tl.store(out_ptr + 4 * R + rows, pg, mask=rmask)
    tl.store(out_ptr + 5 * R + rows, kl, mask=rmask)
    tl.store(out_ptr + 6 * R + rows, clipped.to(tl.float32), mask=rmask)
    tl.store(out_ptr + 7 * R + rows, ent_t, mask=rmask)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            valid = rmask[:, None] & (cols < V)[None, :]
            zs = tl.load(zs_ptr + rows[:, None] * stride_zs + cols[None, :], mask=valid, other=0.0) * inv_t
            zt = zs
            if TEACHER == 1:
                zt = tl.load(zt_ptr + rows[:, None] * stride_zt + cols[None, :], mask=valid, other=0.0) * inv_t
            dz = grad_tile(zs, zt, valid, cols, tgt, m_s, log_ls, ent, c_lp, lam, distill, kl_sm, m_t, log_lt,
                           s_hat, ent_coef, beta, log_beta, log_1mbeta, TEACHER, DIV)
            tl.store(zs_ptr + rows[:, None] * stride_zs + cols[None, :], dz * scale, mask=valid)


def cuda_config(cc: int, vocab: int):
    """(block constexprs, launch options) on a GPU of compute capability ``cc`` (90 Hopper, 80 Ampere).

    One row per program sweeping 2048-wide vocabulary tiles: 36–78 registers and no stack on sm_80
    and sm_90 (benchmarks/kernel_resources.py), the kernel is bandwidth-bound, one config serves both.
    """
    return dict(BLOCK_R=1, BLOCK_V=min(triton.next_power_of_2(vocab), 2048)), dict(num_warps=8)


def atod_rows(zs, zt, tgt, old, adv, lam, ref, sparse_sums, scale, *, teacher, divergence, jsd_beta, temperature,
              clip_eps_low, clip_eps_high, dual_clip, kl_coef, entropy_coef, write_grad, teacher_logprobs=None):
    """Per-row ATOD terms of a chunk; with ``write_grad`` overwrite ``zs`` with d(loss)/d(zs).

    Shapes: zs, zt ``[R, V]`` float32 raw logits (zt ignored unless ``teacher == "dense"``), row stride 1
    along V; tgt ``[R]`` int64; old, adv, lam, ref ``[R]`` float32 (old None: the rows' own log-probs,
    adv None: no PPO); sparse_sums ``[R, 3]`` float32; teacher_logprobs ``[R]`` float32 (sampled teacher);
    scale ``[1]`` float32 (1 / (normalizer · T)). Returns ``[8, R]`` float32 in the order of ``OUT_FIELDS``.
    """
    r, v = zs.shape
    assert zs.dtype == torch.float32 and zs.stride(1) == 1
    out = torch.empty((len(OUT_FIELDS), r), dtype=torch.float32, device=zs.device)
    if r == 0:
        return out
    if (teacher == "sampled") != (teacher_logprobs is not None):
        raise ValueError(f"teacher_logprobs is the sampled teacher's input (teacher={teacher!r})")
    if adv is None:  # pg = −0·r = 0 and never clipped: the PPO terms vanish without a kernel variant
        adv = torch.zeros(r, dtype=torch.float32, device=zs.device)
    if zs.device.type == "cuda":
        blocks, launch = cuda_config(torch.cuda.get_device_capability(zs.device)[0] * 10, v)
    else:  # interpreter: a few rows per program keep numpy's work per program low
        blocks = dict(BLOCK_R=min(16, triton.next_power_of_2(r)), BLOCK_V=min(triton.next_power_of_2(v), 256))
        launch = dict(num_warps=1)
    zt_ = zt if teacher == "dense" else zs
    # Unused pointers get a tensor of the right kind; DIV is read with a dense teacher only.
    _atod_rows_kernel[(triton.cdiv(r, blocks["BLOCK_R"]),)](
        zs, zt_, zs.stride(0), zt_.stride(0),
        tgt, adv if old is None else old, adv, lam, adv if ref is None else ref,
        adv if sparse_sums is None else sparse_sums, adv if teacher_logprobs is None else teacher_logprobs, scale, out,
        r, v, 1.0 / temperature, 1.0 - clip_eps_low, 1.0 + clip_eps_high,
        0.0 if dual_clip is None else float(dual_clip), float(kl_coef), float(entropy_coef),
        *jsd_constants(jsd_beta),
        TEACHER=TEACHER_CODES[teacher], DIV=DIV_CODES.get(divergence, 0), HAS_OLD=old is not None,
        HAS_REF=ref is not None, HAS_DUAL=dual_clip is not None, WRITE_GRAD=write_grad, **blocks, **launch,
    )
    return out
