"""Random packed multi-turn batches for the GAE tests."""

from __future__ import annotations

import numpy as np


def random_mask(rng: np.random.Generator, length: int, p_action: float = 0.5) -> np.ndarray:
    """Alternating observation / action runs (turns) of random lengths, starting either way."""
    mask = np.zeros(length, dtype=bool)
    i, action = 0, bool(rng.random() < 0.5)
    while i < length:
        run = int(rng.integers(1, max(2, length // 3) + 1))
        mask[i:i + run] = action if rng.random() < 0.9 else bool(rng.random() < p_action)
        i += run
        action = not action
    return mask


def random_batch(rng: np.random.Generator, lengths, *, sparse_rewards: bool = True):
    """(rewards, values, cu_seqlens, action_mask) as float32/int64/bool numpy arrays.

    Rewards sit on action tokens only: on the last token of each action run when sparse,
    else on every action token.
    """
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    T = int(cu[-1])
    mask = np.concatenate([random_mask(rng, n) for n in lengths]) if T else np.zeros(0, dtype=bool)
    values = rng.standard_normal(T).astype(np.float32)
    rewards = rng.standard_normal(T).astype(np.float32)
    if sparse_rewards:
        run_end = mask & ~np.append(mask[1:], False)
        rewards = np.where(run_end, rewards, 0.0).astype(np.float32)
    rewards = np.where(mask, rewards, 0.0).astype(np.float32)
    return rewards, values, cu, mask
