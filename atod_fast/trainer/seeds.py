"""Disjoint environment-seed spaces, so held-out evaluation never replays a training episode.

The ranges are :mod:`atod_fast.envs.base`'s: environments with their own train/dev/test folds read
the split from the seed (``split_of``).
"""

from __future__ import annotations

from ..envs.base import DEMO_BASE as _DEMO_BASE
from ..envs.base import DEV_BASE as _DEV_BASE
from ..envs.base import EVAL_BASE as _EVAL_BASE

_PROBE_BASE = 1 << 42
"""The teacher's probe episodes (the hand-over gate's bar): train split, above every demonstration seed in use."""
_PER_STEP = 1 << 16


def train_seeds(seed: int, step: int, n: int) -> list[int]:
    """Environment seeds of training step ``step`` (all below 2**40)."""
    if n > _PER_STEP:
        raise ValueError(f"rollout.episodes_per_step must be <= {_PER_STEP}, got {n}")
    base = ((seed * 1_000_003 + step) * _PER_STEP) % _EVAL_BASE
    return [(base + i) % _EVAL_BASE for i in range(n)]


def eval_seeds(n: int) -> list[int]:
    """Held-out seeds (test split), the same for every run and model."""
    return [_EVAL_BASE + i for i in range(n)]


def dev_seeds(n: int) -> list[int]:
    """Held-out seeds of the dev split, for selection (never the test split's)."""
    return [_DEV_BASE + i for i in range(n)]


def demo_seeds(seed: int, n: int) -> list[int]:
    """Seeds of expert demonstrations for SFT."""
    return [_DEMO_BASE + seed * 10_000_000 + i for i in range(n)]


def probe_seeds(n: int) -> list[int]:
    """Seeds of the teacher's training-distribution episodes (the hand-over gate's bar), the same for every run."""
    return [_PROBE_BASE + i for i in range(n)]


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """Seed of torch's generator for one training step (sampling, minibatch order)."""
    return (seed * 7_919 + step * 104_729 + salt * 15_485_863) % (1 << 62)
