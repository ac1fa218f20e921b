"""The advantage estimator: per agent row, the advantage the PPO term weighs and the value head's target.

An :class:`AdvantageEstimator` is called once per step with the :class:`StepBatch` and, when it
``needs_values``, the value head's output on every packed token (``[T]``, no grad). It returns
``(advantages [A], returns [A] or None)`` on the batch's device; ``returns`` None means the
value head is not trained. A critic-free estimator reads what it needs from the batch: each
trajectory's reward (``batch.trajs[b].reward``), its seed (the group of episodes that share a
start) and ``batch.trajectory_of_rows()`` to broadcast per-episode numbers to rows.

Whitening (``ppo.whiten_advantages``) is over the global batch: with several ranks the
statistics are summed over all of them (:func:`whiten`).

:class:`GaeEstimator` is GAE with the value head over the packed trajectories;
:class:`~atod_fast.trainer.grpo.GrpoEstimator` (``ppo.advantage=grpo``) needs no values.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..ops.gae import compute_gae, masked_whiten, turn_rewards_to_tokens
from .batch import StepBatch
from .distributed import Dist, whiten_global


@runtime_checkable
class AdvantageEstimator(Protocol):
    needs_values: bool
    """Whether ``values`` is passed and the value head trained on the returned ``returns``."""

    def __call__(self, batch: StepBatch, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        ...


def whiten(adv: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Advantages whitened with the mean and variance of every rank's advantages together."""
    if dist.world > 1:
        return whiten_global(adv, dist).to(adv.device)
    if adv.numel() > 1:
        return masked_whiten(adv, torch.ones_like(adv, dtype=torch.bool))
    return adv


class GaeEstimator:
    """GAE over the packed trajectories with the value head's values; returns are the value targets.

    GAE runs over the rows 0 .. len-2 of every trajectory (each predicts the next token): a
    turn's reward sits on the row that predicts the turn's last agent token, and a truncated
    episode bootstraps from the value after its last token.
    """

    needs_values = True

    def __init__(self, *, gamma: float, lam: float, whiten_advantages: bool, dist: Dist):
        self.gamma, self.lam, self.whiten, self.dist = gamma, lam, whiten_advantages, dist

    def __call__(self, batch: StepBatch, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if values is None:
            raise ValueError("GaeEstimator needs the value head's values")
        trajs, cu_tok = batch.trajs, batch.packed.cu_seqlens
        rows = torch.ones(int(cu_tok[-1]), dtype=torch.bool)
        rows[cu_tok[1:] - 1] = False
        row_pos = rows.nonzero().squeeze(1)
        cu_rows = cu_tok - torch.arange(len(trajs) + 1)
        act_rows = batch.action_mask[row_pos + 1]
        k = max((t.num_turns for t in trajs), default=0)
        turn_rewards = torch.tensor([t.turn_rewards + [0.0] * (k - t.num_turns) for t in trajs],
                                    dtype=torch.float64).reshape(len(trajs), k)
        rewards = turn_rewards_to_tokens(cu_rows, act_rows, turn_rewards=turn_rewards,
                                         turn_ids=batch.turn_idx[row_pos + 1])
        values = values.float().cpu()
        boot = torch.tensor([float(values[int(cu_tok[b + 1]) - 1]) if t.truncated else 0.0
                             for b, t in enumerate(trajs)])
        adv, ret = compute_gae(rewards, values[row_pos], cu_rows, act_rows, gamma=self.gamma, lam=self.lam,
                               bootstrap_values=boot)
        adv, ret = adv[act_rows].to(batch.device), ret[act_rows].to(batch.device)
        return (whiten(adv, self.dist) if self.whiten else adv), ret


def make_estimator(cfg, dist: Dist) -> AdvantageEstimator:
    """The estimator ``ppo.advantage`` names: ``gae`` (:class:`GaeEstimator`) or ``grpo`` (critic-free,
    :class:`~atod_fast.trainer.grpo.GrpoEstimator` over groups of ``rollout.group_size`` episodes)."""
    if cfg.ppo.advantage == "grpo":
        from .grpo import GrpoEstimator

        return GrpoEstimator(cfg.group_size, cfg.rollout.episodes_per_step, dist)
    return GaeEstimator(gamma=cfg.ppo.gamma, lam=cfg.ppo.gae_lambda, whiten_advantages=cfg.ppo.whiten_advantages,
                        dist=dist)
