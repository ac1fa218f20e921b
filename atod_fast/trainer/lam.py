"""The λ controller: λ per agent token, mixing distillation (λ) and PPO (1 − λ) in the loss.

A :class:`LambdaController` is asked ``lam(step, turn_idx)`` once per step (``step`` is the
1-based training step being taken; ``turn_idx`` the turn of every agent token) and told
``observe(step, metrics)`` with the finished step's logged metrics, so a controller may react
to training progress. Whatever it keeps goes into checkpoints as JSON-able ``state_dict()``
and comes back through ``load_state_dict()`` on resume, so a resumed run sees the same λ.
``lambda_max`` bounds every λ it will give (0: the teacher is never needed);
``lambda_turn(step, n)`` is λ of turns 0 .. n-1 at ``step``, the ``lambda_turn`` metric.

:class:`ScheduleController` is the stateless :class:`~atod_fast.ops.schedule.AnnealSchedule`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..ops.schedule import AnnealSchedule
from .config import TrainConfig


@runtime_checkable
class LambdaController(Protocol):
    lambda_max: float

    def lam(self, step: int, turn_idx: torch.Tensor) -> torch.Tensor:
        """float32 λ of each token, of ``turn_idx``'s shape and device."""
        ...

    def lambda_turn(self, step: int, n_turns: int) -> list[float]:
        ...

    def observe(self, step: int, metrics: dict) -> None:
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


def build_schedule(cfg: TrainConfig, turn_horizon: int) -> AnnealSchedule:
    """The schedule the ``schedule.*`` keys describe; ``turn_horizon`` when ``schedule.turn_horizon`` is unset."""
    s = cfg.schedule
    total = s.total_steps or cfg.max_steps
    horizon = s.turn_horizon or turn_horizon
    if s.mode == "opd":
        return AnnealSchedule.opd(total, horizon)
    if s.mode == "rl":
        return AnnealSchedule.rl(total, horizon)
    return AnnealSchedule(total, horizon, lambda_max=s.lambda_max, lambda_min=s.lambda_min,
                          time_decay=s.time_decay, turn_decay=s.turn_decay)


class ScheduleController:
    """λ from a fixed :class:`AnnealSchedule`: training step t (1-based) is the schedule's step t − 1."""

    def __init__(self, schedule: AnnealSchedule):
        self.schedule = schedule

    @property
    def lambda_max(self) -> float:
        return self.schedule.lambda_max

    def lam(self, step: int, turn_idx: torch.Tensor) -> torch.Tensor:
        return self.schedule(step - 1, turn_idx)

    def lambda_turn(self, step: int, n_turns: int) -> list[float]:
        return self.schedule(step - 1, torch.arange(max(self.schedule.turn_horizon, n_turns))).tolist()

    def observe(self, step: int, metrics: dict) -> None:
        pass  # a fixed schedule does not react

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"ScheduleController keeps no state, got keys {sorted(state)}")
