"""Plain-Python GAE over packed trajectories: the definition every backend is tested against.

A direct transcription of the recurrence, one token at a time in float64. Slow on purpose:
it is the oracle, not an implementation to use.
"""

from __future__ import annotations

from collections.abc import Sequence


def gae_reference(
    rewards: Sequence[float],
    values: Sequence[float],
    cu_seqlens: Sequence[int],
    action_mask: Sequence[bool],
    *,
    gamma: float,
    lam: float,
    bootstrap_values: Sequence[float] | None = None,
) -> tuple[list[float], list[float]]:
    """GAE per trajectory over its action tokens only; 0 elsewhere. Returns (advantages, returns).

    With a_0 < … < a_{m−1} the action positions of trajectory b::

        next_k = V[a_{k+1}]  (k < m−1),   bootstrap_values[b] or 0  (k = m−1)
        δ_k = r[a_k] + γ·next_k − V[a_k],   A_k = δ_k + γλ·A_{k+1},   R_k = A_k + V[a_k]
    """
    T = len(rewards)
    adv, ret = [0.0] * T, [0.0] * T
    for b in range(len(cu_seqlens) - 1):
        actions = [i for i in range(cu_seqlens[b], cu_seqlens[b + 1]) if action_mask[i]]
        next_value = 0.0 if bootstrap_values is None else float(bootstrap_values[b])
        a = 0.0
        for i in reversed(actions):
            delta = float(rewards[i]) + gamma * next_value - float(values[i])
            a = delta + gamma * lam * a
            adv[i], ret[i] = a, a + float(values[i])
            next_value = float(values[i])
    return adv, ret
