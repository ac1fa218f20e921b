"""The λ(t, τ) schedule that mixes distillation and PPO per token.

    λ(t, τ) = λ_min + (λ_max − λ_min) · c_time(p_t) · c_turn(p_τ)
    p_t = clamp(t / total_steps, 0, 1)
    p_τ = clamp(τ / (turn_horizon − 1), 0, 1)      (p_τ = 0 when turn_horizon == 1)

Each decay c(p) goes from 1 at p = 0 to 0 at p = 1 (except "constant", which stays 1):
early in training the first turn imitates the teacher (λ_max) and the last turn is
mostly reward-driven (λ_min); late in training every turn gets λ_min.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

import torch

_EXP_K = 5.0
_EXP_FLOOR = math.exp(-_EXP_K)


def _cosine(p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.cos(math.pi * p))


def _linear(p: torch.Tensor) -> torch.Tensor:
    return 1.0 - p


def _exponential(p: torch.Tensor) -> torch.Tensor:
    # Shifted and rescaled so that c(0) = 1 and c(1) = 0 exactly, like the others.
    return (torch.exp(-_EXP_K * p) - _EXP_FLOOR) / (1.0 - _EXP_FLOOR)


def _constant(p: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(p)


DECAYS = {"cosine": _cosine, "linear": _linear, "exponential": _exponential, "constant": _constant}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def schedule_problem(**params) -> tuple[str, str, object] | None:
    """The first invalid schedule parameter as ``(name, expected, got)``, or None when all are valid.

    Checks the parameters given (any of ``AnnealSchedule``'s fields); the schedule and the trainer's
    config report the problem in their own words.
    """
    for name in ("total_steps", "turn_horizon"):
        if name in params and not (_is_int(params[name]) and params[name] >= 1):
            return name, "an integer >= 1", params[name]
    for name in ("lambda_max", "lambda_min"):
        v = params.get(name, 0.0)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0):
            return name, "a number in [0, 1]", v
    lo, hi = params.get("lambda_min", 0.0), params.get("lambda_max", 1.0)
    if lo > hi:
        return "lambda_min", f"<= lambda_max={hi}", lo
    for name in ("time_decay", "turn_decay"):
        if name in params and params[name] not in DECAYS:
            return name, f"one of {sorted(DECAYS)}", params[name]
    return None


@dataclass(frozen=True)
class AnnealSchedule:
    """λ(step, turn) for the ATOD loss; call it as ``schedule(step, turn_idx)``."""

    total_steps: int
    """Training steps over which λ anneals in time; later steps stay at the final value."""
    turn_horizon: int
    """Number of turns over which λ anneals in the turn index; later turns stay at the last value."""
    _: KW_ONLY
    lambda_max: float = 0.9
    """λ of the first turn at step 0 (the most teacher-driven token)."""
    lambda_min: float = 0.1
    """Floor of λ, reached by the last turn and by every turn at the end of training."""
    time_decay: str = "cosine"
    """Decay over training steps: one of cosine, linear, exponential, constant."""
    turn_decay: str = "cosine"
    """Decay over turn indices: one of cosine, linear, exponential, constant."""

    def __post_init__(self):
        bad = schedule_problem(total_steps=self.total_steps, turn_horizon=self.turn_horizon,
                               lambda_max=self.lambda_max, lambda_min=self.lambda_min, time_decay=self.time_decay,
                               turn_decay=self.turn_decay)
        if bad is not None:
            name, expected, got = bad
            raise ValueError(f"{name} must be {expected}, got {got!r}")

    @classmethod
    def opd(cls, total_steps: int = 1, turn_horizon: int = 1) -> AnnealSchedule:
        """λ ≡ 1: pure on-policy distillation (the teacher is the only signal)."""
        return cls(total_steps, turn_horizon, lambda_max=1.0, lambda_min=1.0,
                   time_decay="constant", turn_decay="constant")

    @classmethod
    def rl(cls, total_steps: int = 1, turn_horizon: int = 1) -> AnnealSchedule:
        """λ ≡ 0: pure PPO (the reward is the only signal)."""
        return cls(total_steps, turn_horizon, lambda_max=0.0, lambda_min=0.0,
                   time_decay="constant", turn_decay="constant")

    def time_factor(self, step: int) -> float:
        """c_time(p_t) for one step, as a Python float."""
        p_t = min(max(step / self.total_steps, 0.0), 1.0)
        return float(DECAYS[self.time_decay](torch.tensor(p_t, dtype=torch.float64)))

    def __call__(self, step: int, turn_idx: torch.Tensor) -> torch.Tensor:
        """λ for every token.

        Args:
            step: the training step t (an int).
            turn_idx: ``[...]`` integer tensor of turn indices τ (0 for the first turn).

        Returns:
            float32 tensor of the same shape and device as ``turn_idx``.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {type(step).__name__}")
        if not isinstance(turn_idx, torch.Tensor):
            turn_idx = torch.as_tensor(turn_idx)
        if turn_idx.dtype.is_floating_point or turn_idx.dtype.is_complex or turn_idx.dtype == torch.bool:
            raise ValueError(f"turn_idx must be an integer tensor, got dtype {turn_idx.dtype}")
        if self.turn_horizon == 1:
            p_tau = torch.zeros(turn_idx.shape, dtype=torch.float64, device=turn_idx.device)
        else:
            p_tau = (turn_idx.to(torch.float64) / (self.turn_horizon - 1)).clamp(0.0, 1.0)
        c_turn = DECAYS[self.turn_decay](p_tau)
        lam = self.lambda_min + (self.lambda_max - self.lambda_min) * self.time_factor(step) * c_turn
        return lam.to(torch.float32)
