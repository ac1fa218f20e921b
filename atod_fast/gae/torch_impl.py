"""Vectorized pure-PyTorch GAE: the fallback when the C++ extension is not built.

No Python loop over tokens. The action tokens of all trajectories are compacted into one
sequence; the recurrence A_k = δ_k + g_k·A_{k+1}, with g_k = γλ inside a trajectory and 0 at
its last action token, is a first-order linear recurrence, solved by a blocked parallel scan
in float64 (doubling inside blocks of ``_BLOCK`` tokens, then the same scan over the blocks).
Works on CPU and CUDA tensors.
"""

from __future__ import annotations

import torch

from .inputs import GaeInputs, check_token_values

_BLOCK = 64


def _reverse_linear_scan(d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Solve A_k = d_k + g_k·A_{k+1} (A_n = 0) for 1-D float64 d, g. [n] -> [n]

    Each element is the affine map x ↦ a + p·x of A_{k+1}; composing neighbours doubles the
    reach of every element per step, so log2(_BLOCK) steps solve a block, and the value
    entering each block from the right comes from the same scan over the blocks' first maps.
    """
    n = d.shape[0]
    if n == 0:
        return d
    nb = -(-n // _BLOCK)
    pad = nb * _BLOCK - n
    a = torch.nn.functional.pad(d, (0, pad)).view(nb, _BLOCK)
    p = torch.nn.functional.pad(g, (0, pad)).view(nb, _BLOCK)
    s = 1
    while s < _BLOCK:
        # out of place: the right-hand sides must read the values before this step
        a = torch.cat([a[:, :-s] + p[:, :-s] * a[:, s:], a[:, -s:]], dim=1)
        p = torch.cat([p[:, :-s] * p[:, s:], p[:, -s:]], dim=1)
        s *= 2
    # a, p: A_k = a_k + p_k·(A at the first token of the next block)
    if nb > 1:
        head = _reverse_linear_scan(a[:, 0].contiguous(), p[:, 0].contiguous())
        incoming = torch.cat([head[1:], head.new_zeros(1)])
        a = a + p * incoming[:, None]
    return a.reshape(-1)[:n]


def gae_torch(x: GaeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE of validated inputs; float32 ``(advantages, returns)`` [T] on the inputs' device."""
    check_token_values(x)
    T, dev = x.num_tokens, x.rewards.device
    adv = torch.zeros(T, dtype=torch.float32, device=dev)
    ret = torch.zeros(T, dtype=torch.float32, device=dev)
    pos = torch.nonzero(x.action_mask).flatten()
    n = pos.shape[0]
    if n == 0:
        return adv, ret
    r = x.rewards[pos].double()
    v = x.values[pos].double()
    traj = torch.searchsorted(x.cu_seqlens[1:], pos, right=True)
    same = traj[1:] == traj[:-1]     # action k and k+1 belong to one trajectory
    last = torch.cat([~same, same.new_ones(1)])

    next_v = torch.zeros_like(v)
    next_v[:-1] = torch.where(same, v[1:], 0.0)
    if x.bootstrap is not None:
        next_v[last] = x.bootstrap[traj[last]]
    delta = r + x.gamma * next_v - v
    g = torch.zeros_like(v)
    g[:-1] = torch.where(same, x.gamma * x.lam, 0.0)

    a = _reverse_linear_scan(delta, g)
    adv[pos] = a.float()
    ret[pos] = (a + v).float()
    return adv, ret
