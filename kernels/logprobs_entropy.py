"""Row kernels of ``fused_logprobs_entropy``: statistics in the forward, gradient in the backward.

Input: a chunk of R rows of raw logits in float32. The forward sweeps the vocabulary once
with an online softmax; the backward (upstream gradients are per row, so the gradient cannot
be formed before them) recomputes the chunk's logits on the host and writes d/d(logits) over them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lpe_fwd_kernel(z_ptr, stride_z, tgt_ptr, out_ptr, R, V, inv_t,
                    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # z = logits / T; online over vocab tiles: m = max, l = Σ e^(z−m), b = Σ e^(z−m)(m − z) ≥ 0; when the max
    # grows by Δ: l ← e^(−Δ) l, b ← e^(−Δ)(b + Δ·l). Then lse = m + log l, logprob = (z[target] − m) − log l and
    # H = −Σ p log p = log l + b / l, which keeps its accuracy for peaked rows (H ≈ 0 next to lse ≈ 100).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols0 = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    b = tl.zeros((BLOCK_R,), tl.float32)
    z_tgt = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        valid = rmask[:, None] & (cols < V)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=valid, other=float("-inf")) * inv_t
        z = tl.where(rmask[:, None], z, 0.0)
        z0 = tl.where(valid, z, 0.0)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        delta = tl.where(l > 0, m_new - m, 0.0)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        b = alpha * (b + delta * l) + tl.sum(e * (m_new[:, None] - z0), axis=1)
        l = l * alpha + tl.sum(e, axis=1)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z0, 0.0), axis=1)
        m = m_new
    log_l = tl.log(l)
    lse = m + log_l
    tl.store(out_ptr + rows, (z_tgt - m) - log_l, mask=rmask)
    tl.store(out_ptr + R + rows, log_l + b / l, mask=rmask)
    tl.store(out_ptr + 2 * R + rows, lse, mask=rmask)


@triton.jit
def _lpe_bwd_kernel(z_ptr, stride_z, tgt_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, R, V, inv_t,
                    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # d logprob/dz_j = [j = target] − p_j;  dH/dz_j = −p_j (log p_j + H);  times 1/T for raw logits.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols0 = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=rmask, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=rmask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        valid = rmask[:, None] & (cols < V)[None, :]
        ptrs = z_ptr + rows[:, None] * stride_z + cols[None, :]
        lp = tl.load(ptrs, mask=valid, other=0.0) * inv_t - lse[:, None]
        p = tl.exp(lp)
        dz = -p * (g_lp[:, None] + g_ent[:, None] * (lp + ent[:, None]))
        dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
        tl.store(ptrs, dz * inv_t, mask=valid)


def cuda_config(cc: int, vocab: int):
    """(block constexprs, launch options) on a GPU of compute capability ``cc``: one row per program."""
    return dict(BLOCK_R=1, BLOCK_V=min(triton.next_power_of_2(vocab), 4096)), dict(num_warps=8)


def _blocks(z):
    r, v = z.shape
    if z.device.type == "cuda":
        blocks, launch = cuda_config(torch.cuda.get_device_capability(z.device)[0] * 10, v)
        return blocks["BLOCK_R"], blocks["BLOCK_V"], launch
    return min(16, triton.next_power_of_2(max(r, 1))), min(triton.next_power_of_2(v), 256), dict(num_warps=1)


def lpe_rows_forward(z, tgt, temperature):
    """z ``[R, V]`` float32 raw logits, tgt ``[R]`` int64 -> ``[3, R]``: logprob, entropy, lse."""
    r, v = z.shape
    assert z.dtype == torch.float32 and z.stride(1) == 1
    out = torch.empty((3, r), dtype=torch.float32, device=z.device)
    if r:
        br, bv, kw = _blocks(z)
        _lpe_fwd_kernel[(triton.cdiv(r, br),)](z, z.stride(0), tgt, out, r, v, 1.0 / temperature,
                                               BLOCK_R=br, BLOCK_V=bv, **kw)
    return out


def lpe_rows_backward(z, tgt, lse, ent, g_lp, g_ent, temperature):
    """Overwrite raw logits ``z`` ``[R, V]`` with d(g_lp·logprob + g_ent·entropy)/dz; per-row args ``[R]``."""
    r, v = z.shape
    assert z.dtype == torch.float32 and z.stride(1) == 1
    if r:
        br, bv, kw = _blocks(z)
        _lpe_bwd_kernel[(triton.cdiv(r, br),)](z, z.stride(0), tgt, lse, ent, g_lp, g_ent, r, v, 1.0 / temperature,
                                               BLOCK_R=br, BLOCK_V=bv, **kw)
    return z
