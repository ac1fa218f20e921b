"""Critic-free advantages (``ppo.advantage=grpo``): groups of episodes on one environment seed.

The ``episodes_per_step`` episodes of a step form consecutive groups of ``G = rollout.group_size``;
the episodes of a group play the same environment seed (each samples its own moves). An
episode's return (the sum of its rewards) is normalized within its group, mean and unbiased
std (``ops.gae.group_advantages``; a singleton or constant group gives 0), and that one number
is the advantage of every agent token of the episode. No value head is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ops.gae import group_advantages
from .seeds import train_seeds


def group_env_seeds(seed: int, step: int, n: int, group_size: int) -> list[int]:
    """Environment seeds of a step's ``n`` episodes: consecutive runs of ``group_size`` share one.

    With ``group_size == 1`` these are exactly ``train_seeds(seed, step, n)``.
    """
    if group_size < 1 or n % group_size:
        raise ValueError(f"n={n} must be a positive multiple of group_size={group_size}")
    return [s for s in train_seeds(seed, step, n // group_size) for _ in range(group_size)]


def sample_keys(env_seeds: Sequence[int], episode_ids: Sequence[int], group_size: int) -> list[int]:
    """Per-episode sampling keys for engines that seed each request (vLLM): distinct within a group.

    With ``group_size == 1`` the key is the environment seed (as without groups).
    """
    if group_size == 1:
        return list(env_seeds)
    return [s * group_size + j % group_size for s, j in zip(env_seeds, episode_ids, strict=True)]


def episode_returns(turn_rewards: Sequence[Sequence[float]]) -> torch.Tensor:
    """Undiscounted return of each episode: the sum of its turn rewards."""
    return torch.tensor([float(sum(r)) for r in turn_rewards], dtype=torch.float64)


class GrpoEstimator:
    """Group-normalized episode returns on every agent token; no critic (an ``AdvantageEstimator``).

    ``dist``: the process group (rank r holds episodes r, r + world, ... of the step's ``n_global``);
    None: one process.
    """

    needs_values = False

    def __init__(self, group_size: int, n_global: int | None = None, dist=None):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a singleton group's advantage is 0), got {group_size}")
        if n_global is not None and n_global % group_size:
            raise ValueError(f"n_global={n_global} is not a multiple of group_size={group_size}")
        self.group_size, self.n_global, self.dist = group_size, n_global, dist

    def __call__(self, batch, values: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(advantages ``[A]`` on the batch's device, None: no value targets) for a ``StepBatch``."""
        d = self.dist
        world, rank = (d.world, d.rank) if d is not None else (1, 0)
        n_global = self.n_global or len(batch.trajs) * world
        all_reduce = (lambda x: d.all_reduce(x.to(d.comm_device))) if world > 1 else None
        returns = episode_returns([t.turn_rewards for t in batch.trajs])
        adv = self.token_advantages(returns, list(range(n_global))[rank::world], n_global, batch.counts, all_reduce)
        return adv.to(batch.device), None

    def episode_advantages(self, returns: torch.Tensor, episode_ids: Sequence[int], n_global: int,
                           all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Advantages of this process's episodes.

        Args:
            returns: ``[n]`` returns of this process's episodes.
            episode_ids: their indices among the step's ``n_global`` episodes (rank r holds r, r + world, ...).
            n_global: episodes in the step over all processes (a multiple of ``group_size``).
            all_reduce: sums a tensor over processes (None: one process).
        """
        if n_global % self.group_size:
            raise ValueError(f"n_global={n_global} is not a multiple of group_size={self.group_size}")
        ids = torch.as_tensor(list(episode_ids), dtype=torch.long)
        every = torch.zeros(n_global, dtype=torch.float64)
        every[ids] = returns.double().cpu()
        if all_reduce is not None:  # groups span ranks: every rank needs every return of its groups
            every = all_reduce(every).cpu().double()
        adv = group_advantages(every, torch.arange(n_global) // self.group_size)
        return adv[ids]

    def token_advantages(self, returns: torch.Tensor, episode_ids: Sequence[int], n_global: int,
                         counts: Sequence[int], all_reduce=None) -> torch.Tensor:
        """``[sum(counts)]`` float32: each episode's advantage repeated over its ``counts[i]`` agent tokens."""
        adv = self.episode_advantages(returns, episode_ids, n_global, all_reduce)
        return adv.repeat_interleave(torch.as_tensor(list(counts), dtype=torch.long)).float()
