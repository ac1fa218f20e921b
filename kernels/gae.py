"""GAE over packed multi-turn trajectories on the GPU: one program per trajectory.

Walking a trajectory backwards, the state (A, nv) — the advantage of the next action token
and its value — changes at each token by an affine map:

    action token (r, v):   A ← γλ·A + γ·nv + (r − v),   nv ← v      (then adv = A, ret = A + v)
    observation token:     identity (no discount, no value)

Affine maps compose associatively, so each block of BLOCK tokens (loaded back to front) is
one parallel prefix scan of maps (p, q, s, a, n) meaning (A, nv) ↦ (p·A + q·nv + a, s·nv + n),
applied to the state carried in from the block after it. Everything is float64.

The same pass flags bad tokens (non-finite reward or value, nonzero reward on an
observation token) per trajectory, so the caller can raise without a second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(p1, q1, s1, a1, n1, p2, q2, s2, a2, n2):
    # map 2 after map 1
    return p2 * p1, p2 * q1 + q2 * s1, s2 * s1, p2 * a1 + q2 * n1 + a2, s2 * n1 + n2


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, cu_ptr, boot_ptr, adv_ptr, ret_ptr, bad_ptr, gamma, gamma_lam,
                HAS_BOOT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    carry_a = tl.zeros((), dtype=tl.float64)
    if HAS_BOOT:  # noqa: SIM108 (a constexpr branch reads clearer in a kernel)
        carry_nv = tl.load(boot_ptr + b).to(tl.float64)
    else:
        carry_nv = tl.zeros((), dtype=tl.float64)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    lane = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(end - start, BLOCK)):
        offs = end - 1 - i * BLOCK - lane            # back to front
        valid = offs >= start
        act = tl.load(m_ptr + offs, mask=valid, other=0) != 0
        r = tl.load(r_ptr + offs, mask=valid, other=0.0).to(tl.float64)
        v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float64)
        bad |= ((r - r != 0) | (v - v != 0) | (~act & (r != 0))).to(tl.int32)   # x − x is NaN for ±inf, NaN

        one = tl.full((BLOCK,), 1.0, tl.float64)
        zero = tl.zeros((BLOCK,), tl.float64)
        p = tl.where(act, one * gamma_lam, one)
        q = tl.where(act, one * gamma, zero)
        s = tl.where(act, zero, one)
        a = tl.where(act, r - v, zero)
        n = tl.where(act, v, zero)
        p, q, s, a, n = tl.associative_scan((p, q, s, a, n), 0, _compose)
        adv = p * carry_a + q * carry_nv + a
        nv = s * carry_nv + n
        tl.store(adv_ptr + offs, tl.where(act, adv, 0.0).to(tl.float32), mask=valid)
        tl.store(ret_ptr + offs, tl.where(act, adv + v, 0.0).to(tl.float32), mask=valid)
        # invalid lanes are identity maps, so the last lane holds the state after the block
        carry_a = tl.sum(tl.where(lane == BLOCK - 1, adv, 0.0), 0)
        carry_nv = tl.sum(tl.where(lane == BLOCK - 1, nv, 0.0), 0)
    tl.store(bad_ptr + b, tl.max(bad, 0))


def gae_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bootstrap_values: torch.Tensor | None,
    gamma: float,
    lam: float,
    *,
    block: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE with one program per trajectory; inputs already validated and contiguous.

    rewards, values: [T] float; action_mask: [T] bool; cu_seqlens: [B+1] int64;
    bootstrap_values: [B] or None. Returns float32 ``(advantages [T], returns [T])`` and an
    int32 ``[B]`` flag, nonzero for trajectories holding a bad token.
    """
    T, B = rewards.shape[0], cu_seqlens.shape[0] - 1
    adv = torch.empty(T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty(T, dtype=torch.float32, device=rewards.device)
    bad = torch.zeros(max(B, 1), dtype=torch.int32, device=rewards.device)
    if B == 0:
        return adv, ret, bad[:0]
    boot = bootstrap_values if bootstrap_values is not None else adv  # unread when HAS_BOOT is False
    _gae_kernel[(B,)](
        rewards, values, action_mask.view(torch.uint8), cu_seqlens, boot, adv, ret, bad, float(gamma),
        float(gamma) * float(lam), HAS_BOOT=bootstrap_values is not None, BLOCK=block, num_warps=4,
    )
    return adv, ret, bad
