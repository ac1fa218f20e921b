"""Vectorized pure-PyTorch GAE: the fallback when the C++ extension is not built.

No Python loop over tokens. The action tokens of all trajectories are compacted into one
sequence, where every step discounts by the same c = γλ, so within trajectory b

    A_k = Σ_{j ≥ k, j in b} c^{j−k} δ_j

a discounted suffix sum. Each trajectory is cut into blocks of ``_BLOCK`` tokens (the last
one zero-padded); one float64 matmul with the upper-triangular Toeplitz matrix
M[k, j] = c^{j−k} gives the sums inside every block, and the sums entering each block from
the right come from the same computation over the blocks' first entries, with c^_BLOCK.
Works on CPU and CUDA tensors.
"""

from __future__ import annotations

import torch

from .inputs import GaeInputs, check_token_values

_BLOCK = 64


def _toeplitz_t(c: float, L: int, like: torch.Tensor) -> torch.Tensor:
    """Mᵀ with M[k, j] = c^{j−k} for j ≥ k, else 0 (0⁰ = 1 keeps c = 0 exact). [L, L]"""
    k = torch.arange(L, device=like.device, dtype=like.dtype)
    expo = k[None, :] - k[:, None]          # j − k
    base = torch.tensor(c, dtype=like.dtype, device=like.device)
    m = torch.where(expo >= 0, torch.pow(base, expo.clamp(min=0)), 0.0)
    return m.t().contiguous()


def _discounted_suffix_sums(d: torch.Tensor, counts: torch.Tensor, c: float) -> torch.Tensor:
    """A_k = Σ_{j ≥ k, same segment} c^{j−k} d_j over consecutive segments of ``counts`` entries.

    d: [n] float64, counts: [S] int64 summing to n. Returns [n] float64.
    """
    n, L = d.shape[0], _BLOCK
    if n == 0:
        return d
    blocks = (counts + (L - 1)) // L
    starts = torch.cumsum(counts, 0) - counts
    block_starts = torch.cumsum(blocks, 0) - blocks
    dest = torch.arange(n, device=d.device) + torch.repeat_interleave(block_starts * L - starts, counts, output_size=n)
    nb = int(block_starts[-1] + blocks[-1])
    padded = d.new_zeros(nb * L)
    padded[dest] = d
    a = padded.view(nb, L) @ _toeplitz_t(c, L, d)   # sums inside each block
    if int(blocks.max()) > 1:
        # x_b = the full suffix sum at the first entry of block b; block b then receives
        # c^{L−k}·x_{b+1} at entry k when block b+1 continues its segment
        x = _discounted_suffix_sums(a[:, 0].contiguous(), blocks, c**L)
        nxt = torch.zeros_like(x)
        nxt[:-1] = x[1:]
        nxt[(block_starts + blocks - 1)[blocks > 0]] = 0.0
        decay = torch.pow(torch.tensor(c, dtype=d.dtype, device=d.device),
                          torch.arange(L, 0, -1, device=d.device, dtype=d.dtype))
        a.addcmul_(nxt[:, None], decay[None, :])
    return a.view(-1)[dest]


def _values_look_ok(x: GaeInputs, r_act: torch.Tensor, n_act: int) -> bool:
    """Cheap pass: True when no token can be bad (finite, and no reward off the mask).

    Float64 sums are finite iff every float32/16 term is; the nonzero rewards all sit on
    action tokens iff there are as many among the action tokens as in the whole array.
    A false alarm (float64 sums overflowing) only costs the exact check.
    """
    if not bool(torch.isfinite(x.values.sum(dtype=torch.float64))):
        return False
    if n_act and not bool(torch.isfinite(r_act.sum())):
        return False
    return int(torch.count_nonzero(x.rewards)) == int(torch.count_nonzero(r_act))


def gae_torch(x: GaeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE of validated inputs; float32 ``(advantages, returns)`` [T] on the inputs' device."""
    T, dev = x.num_tokens, x.rewards.device
    pos = torch.nonzero(x.action_mask).flatten()
    n = pos.shape[0]
    r = x.rewards[pos].double()
    if not _values_look_ok(x, r, n):
        check_token_values(x)   # raises for a bad token; a false alarm falls through
    adv = torch.zeros(T, dtype=torch.float32, device=dev)
    ret = torch.zeros(T, dtype=torch.float32, device=dev)
    if n == 0:
        return adv, ret
    v = x.values[pos].double()
    before = torch.searchsorted(pos, x.cu_seqlens)      # action tokens before each offset
    counts = before[1:] - before[:-1]
    has = counts > 0
    last = before[1:][has] - 1                           # last action token of each trajectory

    next_v = torch.empty_like(v)
    next_v[:-1] = v[1:]
    next_v[last] = 0.0 if x.bootstrap is None else x.bootstrap[has]
    delta = torch.add(r, next_v, alpha=x.gamma).sub_(v)
    a = _discounted_suffix_sums(delta, counts, x.gamma * x.lam)
    adv[pos] = a.float()
    ret[pos] = a.add_(v).float()
    return adv, ret
