"""Fully fused ATOD loss: logits tiles live only in registers (Cut Cross-Entropy style).

Forward: one program per block of rows sweeps the vocabulary in tiles; each tile of student
(and teacher) logits is formed with ``tl.dot`` over the hidden dimension (a teacher given as
logits is loaded tile by tile instead) and folded into the online statistics of softmax_tiles
(JSD adds a second sweep, recomputing the tiles). Output: 9 floats per row. Backward: one
program per (row block, vocab tile) recomputes its tiles, forms dℓ/dz in registers and
accumulates ``grad_h += dz @ W`` and ``grad_W += dzᵀ @ h`` (and grad_b) into float32 buffers
with atomic adds.

FLOPs against the chunked path (6·N·H·V + 2·N·Ht·V): forward 2·N·(H + Ht)·V, backward
2·N·(H + Ht)·V to recompute + 4·N·H·V, so 8·N·H·V + 4·N·Ht·V in all; JSD adds another
2·N·(H + Ht)·V in the forward. Memory: the per-row statistics and the float32 gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codes import DIV_CODES, TEACHER_CODES
from .softmax_tiles import grad_tile, jsd_constants, jsd_tile, stats_finish, stats_update

STATS = ("m_s", "log_ls", "entropy", "logprob", "distill", "kl_sm", "m_t", "log_lt", "teacher_entropy")
"""Rows of the forward's [9, N] output. For a sparse teacher ``distill`` holds Σ p̂ z_s[id] and the
host finishes the divergence; the backward reads Σ p̂ from the ``kl_sm`` row (the host puts it there).
``teacher_entropy`` is the dense teacher's (0 for the other kinds: the host has theirs)."""


@triton.jit
def _logits_tile(h_ptr, s_hn, s_hk, w_ptr, s_wv, s_wk, b_ptr, rows, cols, rmask, cmask, K, inv_t,
                 HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # z[rows, cols] = (h[rows] · W[cols]ᵀ + b[cols]) / T, float32 accumulation over K.
    rows = rows.to(tl.int64)  # V·H passes 2^31 for the largest heads
    cols = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk, mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + cols[None, :] * s_wv + ks[:, None] * s_wk, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _teacher_tile(ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr, rows, cols, rmask, cmask, HT, inv_t,
                  HAS_BT: tl.constexpr, TLOGITS: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Teacher logits / T on the tile: formed from (h_t, W_t) or, with TLOGITS, read from the [N, V'] logits
    # at ht_ptr (strides s_htn, s_htk); -inf outside the row / column masks either way is the caller's job.
    if TLOGITS:
        z = tl.load(ht_ptr + rows.to(tl.int64)[:, None] * s_htn + cols.to(tl.int64)[None, :] * s_htk,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32) * inv_t
    else:
        z = _logits_tile(ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr, rows, cols, rmask, cmask, HT, inv_t,
                         HAS_BT, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
    return z


@triton.jit
def _fused_stats_kernel(
    hs_ptr, s_hsn, s_hsk, ws_ptr, s_wsv, s_wsk, bs_ptr, ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr,
    tgt_ptr, ids_ptr, phat_ptr, stats_ptr, N, V, H, HT, KTOP, inv_t, beta, log_beta, log_1mbeta,
    TEACHER: tl.constexpr, DIV: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, TLOGITS: tl.constexpr,
    PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Online softmax statistics of student and teacher over vocab tiles computed in registers;
    # z_s[target] and (sparse teacher) Σ_k p̂_k z_s[id_k] picked up on the way.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    neg_inf = float("-inf")
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    m_s = tl.full((BLOCK_N,), neg_inf, tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    b_s = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), neg_inf, tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    b_t = tl.zeros((BLOCK_N,), tl.float32)
    x = tl.zeros((BLOCK_N,), tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), tl.float32)
    sp1 = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        valid = rmask[:, None] & cmask[None, :]
        zs = _logits_tile(hs_ptr, s_hsn, s_hsk, ws_ptr, s_wsv, s_wsk, bs_ptr, rows, cols, rmask, cmask, H, inv_t,
                          HAS_BS, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
        zs = tl.where(rmask[:, None], tl.where(valid, zs, neg_inf), 0.0)
        zt = zs
        if TEACHER == 1:
            zt = _teacher_tile(ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr, rows, cols, rmask, cmask, HT,
                               inv_t, HAS_BT, TLOGITS, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
            zt = tl.where(rmask[:, None], tl.where(valid, zt, neg_inf), 0.0)
        z_tgt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & valid, zs, 0.0), axis=1)
        if TEACHER == 2:
            for k in range(KTOP):
                idk = tl.load(ids_ptr + rows * KTOP + k, mask=rmask, other=-1)
                pk = tl.load(phat_ptr + rows * KTOP + k, mask=rmask, other=0.0)
                sp1 += pk * tl.sum(tl.where((cols[None, :] == idk[:, None]) & valid, zs, 0.0), axis=1)
        m_s, l_s, b_s, m_t, l_t, b_t, x = stats_update(m_s, l_s, b_s, m_t, l_t, b_t, x, zs, zt, valid, TEACHER, DIV)
    log_ls, ent, distill, m_t, log_lt, ent_t = stats_finish(m_s, l_s, b_s, m_t, l_t, b_t, x, TEACHER, DIV)
    # Everything but the divergence is final here: stored now, it holds no registers through a JSD sweep.
    tl.store(stats_ptr + 0 * N + rows, m_s, mask=rmask)
    tl.store(stats_ptr + 1 * N + rows, log_ls, mask=rmask)
    tl.store(stats_ptr + 2 * N + rows, ent, mask=rmask)
    tl.store(stats_ptr + 3 * N + rows, (z_tgt - m_s) - log_ls, mask=rmask)
    tl.store(stats_ptr + 6 * N + rows, m_t, mask=rmask)
    tl.store(stats_ptr + 7 * N + rows, log_lt, mask=rmask)
    tl.store(stats_ptr + 8 * N + rows, ent_t, mask=rmask)
    kl_sm = tl.zeros((BLOCK_N,), tl.float32)
    if TEACHER == 1 and DIV == 2:
        kl_tm = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            valid = rmask[:, None] & cmask[None, :]
            zs = _logits_tile(hs_ptr, s_hsn, s_hsk, ws_ptr, s_wsv, s_wsk, bs_ptr, rows, cols, rmask, cmask, H,
                              inv_t, HAS_BS, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
            zt = _teacher_tile(ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr, rows, cols, rmask, cmask, HT,
                               inv_t, HAS_BT, TLOGITS, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
            d_tm, d_sm = jsd_tile(zs, zt, valid, m_s, log_ls, m_t, log_lt, log_beta, log_1mbeta)
            kl_tm += d_tm
            kl_sm += d_sm
        distill = beta * kl_tm + (1.0 - beta) * kl_sm
    if TEACHER == 2:
        distill = sp1
    tl.store(stats_ptr + 4 * N + rows, distill, mask=rmask)
    tl.store(stats_ptr + 5 * N + rows, kl_sm, mask=rmask)


@triton.jit
def _fused_grad_kernel(
    hs_ptr, s_hsn, s_hsk, ws_ptr, s_wsv, s_wsk, bs_ptr, ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr,
    tgt_ptr, ids_ptr, phat_ptr, stats_ptr, clp_ptr, lam_ptr, ecoef_ptr, scale_ptr, gh_ptr, gw_ptr, gb_ptr,
    N, V, H, HT, KTOP, inv_t, beta, log_beta, log_1mbeta,
    TEACHER: tl.constexpr, DIV: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, TLOGITS: tl.constexpr,
    PREC: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dz = scale · dℓ/dz on this (rows × vocab) tile, recomputed from h, W and the row statistics;
    # grad_h[rows] += dz @ W[cols], grad_W[cols] += dzᵀ @ h[rows], grad_b[cols] += Σ_rows dz.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    valid = rmask[:, None] & cmask[None, :]
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    m_s = tl.load(stats_ptr + 0 * N + rows, mask=rmask, other=0.0)
    log_ls = tl.load(stats_ptr + 1 * N + rows, mask=rmask, other=0.0)
    ent = tl.load(stats_ptr + 2 * N + rows, mask=rmask, other=0.0)
    distill = tl.load(stats_ptr + 4 * N + rows, mask=rmask, other=0.0)
    kl_sm = tl.load(stats_ptr + 5 * N + rows, mask=rmask, other=0.0)  # Σ p̂ for a sparse teacher
    m_t = tl.load(stats_ptr + 6 * N + rows, mask=rmask, other=0.0)
    log_lt = tl.load(stats_ptr + 7 * N + rows, mask=rmask, other=0.0)
    c_lp = tl.load(clp_ptr + rows, mask=rmask, other=0.0)
    lam = tl.load(lam_ptr + rows, mask=rmask, other=0.0)
    ent_coef = tl.load(ecoef_ptr + rows, mask=rmask, other=0.0)[:, None]
    zs = _logits_tile(hs_ptr, s_hsn, s_hsk, ws_ptr, s_wsv, s_wsk, bs_ptr, rows, cols, rmask, cmask, H, inv_t,
                      HAS_BS, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
    zt = zs
    if TEACHER == 1:
        zt = _teacher_tile(ht_ptr, s_htn, s_htk, wt_ptr, s_wtv, s_wtk, bt_ptr, rows, cols, rmask, cmask, HT, inv_t,
                           HAS_BT, TLOGITS, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
    dz = grad_tile(zs, zt, valid, cols, tgt, m_s, log_ls, ent, c_lp, lam, distill, kl_sm, m_t, log_lt, kl_sm,
                   ent_coef, beta, log_beta, log_1mbeta, TEACHER, DIV)
    if TEACHER == 2:
        for k in range(KTOP):
            idk = tl.load(ids_ptr + rows * KTOP + k, mask=rmask, other=-1)
            pk = tl.load(phat_ptr + rows * KTOP + k, mask=rmask, other=0.0)
            dz -= tl.where((cols[None, :] == idk[:, None]) & valid, (lam * pk)[:, None], 0.0)
    dz = dz * tl.load(scale_ptr)
    if NEED_B:
        tl.atomic_add(gb_ptr + cols, tl.sum(dz, axis=0), mask=cmask)
    dz_op = dz.to(ws_ptr.dtype.element_ty)  # matmul operand in the weights' dtype, float32 accumulation
    rows = rows.to(tl.int64)  # V·H passes 2^31 for the largest heads
    cols = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        if NEED_H:
            w = tl.load(ws_ptr + cols[:, None] * s_wsv + ks[None, :] * s_wsk, mask=cmask[:, None] & kmask[None, :],
                        other=0.0)
            gh = tl.dot(dz_op, w, input_precision=PREC)
            tl.atomic_add(gh_ptr + rows[:, None] * H + ks[None, :], gh, mask=rmask[:, None] & kmask[None, :])
        if NEED_W:
            h = tl.load(hs_ptr + rows[:, None] * s_hsn + ks[None, :] * s_hsk, mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            gw = tl.dot(tl.trans(dz_op), h, input_precision=PREC)
            tl.atomic_add(gw_ptr + cols[:, None] * H + ks[None, :], gw, mask=cmask[:, None] & kmask[None, :])


# (kernel, arch, float32 operands) -> (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages).
# Chosen so that no variant spills on sm_90 or sm_80 (benchmarks/kernel_resources.py; docs/kernels-tuning.md).
CUDA_CONFIGS = {
    ("_fused_stats_kernel", 90, False): (64, 64, 64, 8, 3),
    ("_fused_stats_kernel", 80, False): (64, 64, 64, 8, 3),
    ("_fused_stats_kernel", 90, True): (32, 64, 32, 8, 2),
    ("_fused_stats_kernel", 80, True): (32, 64, 32, 8, 2),
    ("_fused_grad_kernel", 90, False): (64, 64, 32, 8, 2),
    ("_fused_grad_kernel", 80, False): (64, 64, 32, 8, 2),
    ("_fused_grad_kernel", 90, True): (32, 32, 32, 8, 2),
    ("_fused_grad_kernel", 80, True): (32, 32, 32, 8, 2),
}
# A dense teacher given as logits, where it differs: at the entries above its tile loads spill the stats
# kernel (half precision on sm_90 and sm_80, float32 on sm_90); 32-wide vocabulary tiles do not.
TLOGITS_CONFIGS = {
    ("_fused_stats_kernel", 90, False): (64, 32, 64, 8, 3),
    ("_fused_stats_kernel", 80, False): (64, 32, 64, 8, 3),
    ("_fused_stats_kernel", 90, True): (32, 32, 32, 8, 2),
}


def cuda_config(cc: int, kernel: str, f32: bool, tlogits: bool = False):
    """(block constexprs, launch options) of ``kernel`` on compute capability ``cc`` (≥ 90 uses the
    Hopper entry, anything else the Ampere one) with float32 or half-precision operands, and with
    ``tlogits`` for a dense teacher given as logits."""
    key = (kernel, 90 if cc >= 90 else 80, f32)
    bn, bv, bk, warps, stages = (TLOGITS_CONFIGS.get(key) if tlogits else None) or CUDA_CONFIGS[key]
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk), dict(num_warps=warps, num_stages=stages)


def _config(device, kernel, hs, tlogits):
    if device.type != "cuda":  # interpreter: small tiles keep numpy's work per program low
        return dict(BLOCK_N=32, BLOCK_V=256, BLOCK_K=32), dict(num_warps=1)
    major, minor = torch.cuda.get_device_capability(device)
    return cuda_config(major * 10 + minor, kernel, hs.dtype == torch.float32, tlogits)


def _precision(hs):
    # float32 inputs get exact float32 products (no TF32); half inputs use the tensor cores as they are.
    return "ieee" if hs.dtype == torch.float32 else None


def _common(hs, ws, bs, ht, wt, bt, tgt, ids, phat, teacher):
    # A teacher given as logits rides in the teacher-hidden slot (its strides are the logits' row and
    # column strides); the unused weight and bias slots get the student's tensors as placeholders.
    dense = teacher == "dense"
    ht_ = ht if dense else hs
    wt_ = wt if dense and wt is not None else ws
    return [hs, hs.stride(0), hs.stride(1), ws, ws.stride(0), ws.stride(1), ws if bs is None else bs,
            ht_, ht_.stride(0), ht_.stride(1), wt_, wt_.stride(0), wt_.stride(1), wt_ if bt is None else bt,
            tgt, tgt if ids is None else ids, ws if phat is None else phat]


def _teacher_flags(teacher, ht, wt, bt, h):
    """(HT, constexprs) of the teacher: its hidden size, and whether it is given as logits (``wt`` None)."""
    dense = teacher == "dense"
    tlogits = dense and wt is None
    return (ht.shape[1] if dense and not tlogits else h), dict(
        TEACHER=TEACHER_CODES[teacher], HAS_BT=bt is not None and dense and not tlogits, TLOGITS=tlogits)


def fused_stats(hs, ws, bs, ht, wt, bt, tgt, ids, phat, *, teacher, divergence, jsd_beta, temperature):
    """Per-row statistics ``[9, N]`` float32 (rows named by ``STATS``).

    hs ``[N, H]`` and ws ``[V, H]`` share a dtype (likewise ht, wt); biases ``[V]`` or None;
    a dense teacher given as logits: ht ``[N, V']`` (V' >= V, any strides, float32 or half), wt and bt None;
    tgt ``[N]`` int64; ids, phat ``[N, K]`` (sparse teacher, p̂ zeroed where the teacher gave -inf).
    """
    n, v = hs.shape[0], ws.shape[0]
    stats = torch.empty((len(STATS), n), dtype=torch.float32, device=hs.device)
    if n == 0:
        return stats
    ht_dim, flags = _teacher_flags(teacher, ht, wt, bt, hs.shape[1])
    blocks, launch = _config(hs.device, "_fused_stats_kernel", hs, flags["TLOGITS"])
    _fused_stats_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](
        *_common(hs, ws, bs, ht, wt, bt, tgt, ids, phat, teacher), stats,
        n, v, hs.shape[1], ht_dim, 0 if ids is None else ids.shape[1], 1.0 / temperature, *jsd_constants(jsd_beta),
        DIV=DIV_CODES.get(divergence, 0), HAS_BS=bs is not None, PREC=_precision(hs), **flags, **blocks, **launch,
    )
    return stats


def fused_grad(hs, ws, bs, ht, wt, bt, tgt, ids, phat, stats, c_lp, lam, ent_coef, scale, *, teacher, divergence,
               jsd_beta, temperature, need_h, need_w, need_b):
    """float32 (grad_h ``[N, H]``, grad_W ``[V, H]``, grad_b ``[V]``), None where not needed.

    c_lp = dℓ/d logprob, lam, ent_coef = −dℓ/dH: ``[N]`` float32 per-row coefficients;
    scale ``[1]`` = grad_output / (normalizer · T).
    """
    n, h = hs.shape
    v = ws.shape[0]
    dev = hs.device
    gh = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_w else None
    gb = torch.zeros((v,), dtype=torch.float32, device=dev) if need_b else None
    if n == 0 or not (need_h or need_w or need_b):
        return gh, gw, gb
    ht_dim, flags = _teacher_flags(teacher, ht, wt, bt, h)
    blocks, launch = _config(dev, "_fused_grad_kernel", hs, flags["TLOGITS"])
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(v, blocks["BLOCK_V"]))
    _fused_grad_kernel[grid](
        *_common(hs, ws, bs, ht, wt, bt, tgt, ids, phat, teacher), stats, c_lp, lam, ent_coef, scale,
        stats if gh is None else gh, stats if gw is None else gw, stats if gb is None else gb,
        n, v, h, ht_dim, 0 if ids is None else ids.shape[1], 1.0 / temperature, *jsd_constants(jsd_beta),
        DIV=DIV_CODES.get(divergence, 0), HAS_BS=bs is not None, PREC=_precision(hs),
        NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, **flags, **blocks, **launch,
    )
    return gh, gw, gb
