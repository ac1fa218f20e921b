"""Adaptive turn weights (``schedule.turn_weighting=adaptive``): λ per turn from disagreement and teacher certainty.

The position rule lowers λ with the turn index whatever happens on the turn. The adaptive rule looks at
what the step's loss already reports per agent token, ``distill`` (the student–teacher divergence) and
``teacher_entropy``, averaged per turn index τ over the step's tokens (the learner's ``turn_distill`` and
``turn_teacher_entropy`` metrics) and smoothed over steps with an exponential moving average
(``schedule.turn_ema``): d_τ and h_τ. Then, over the turns τ < H (``schedule.turn_horizon``; later turns
share turn H − 1's statistics)::

    s_τ = max(d_τ, 0) · exp(−h_τ)          disagreement, discounted where the teacher is unsure
    w_τ = s_τ / mean_τ' s_τ'               mean weight 1 over the turns seen so far
    λ(t, τ) = clamp(λ_t · w_τ, lambda_min, lambda_max)

with λ_t the step's λ of the wrapped controller at turn 0 (its decay in the step alone). A turn the
student already imitates well (small d_τ), or where the teacher's own distribution is flat (large
h_τ), gets less teacher weight and more reward; a turn with a confident teacher the student still
disagrees with gets more. Until a turn has statistics its weight is 1, and while the progress-gated
hand-over holds λ at lambda_max before its gate, λ stays there on every turn: the weights shape the
anneal, not the imitation phase. No extra forward: the statistics are those of earlier steps' updates.
"""

from __future__ import annotations

import math

import torch


class AdaptiveTurnController:
    """Wraps a λ controller (the fixed schedule or the hand-over) and reshapes its λ over turns as above."""

    def __init__(self, base, *, turn_horizon: int, lambda_min: float, lambda_max: float, ema: float):
        self.base, self.horizon, self.ema = base, turn_horizon, ema
        self.lambda_min, self._lambda_max = lambda_min, lambda_max
        self.disagreement: list[float | None] = [None] * turn_horizon
        self.teacher_entropy: list[float | None] = [None] * turn_horizon

    @property
    def lambda_max(self) -> float:
        return self.base.lambda_max

    def weights(self) -> torch.Tensor:
        """w_τ for τ < turn_horizon (float32); 1 for turns without statistics."""
        seen = [i for i, d in enumerate(self.disagreement) if d is not None and self.teacher_entropy[i] is not None]
        w = torch.ones(self.horizon, dtype=torch.float32)
        if not seen:
            return w
        s = torch.tensor([max(self.disagreement[i], 0.0) * math.exp(-self.teacher_entropy[i]) for i in seen],
                         dtype=torch.float64)
        mean = float(s.mean())
        if not math.isfinite(mean) or mean <= 0:
            return w
        w[seen] = (s / mean).float()
        return w

    def _holding(self, step: int) -> bool:
        f = getattr(self.base, "holding", None)
        return f is not None and f(step)

    def lam(self, step: int, turn_idx: torch.Tensor) -> torch.Tensor:
        turn_idx = torch.as_tensor(turn_idx)
        base = self.base.lam(step, turn_idx)
        if self._holding(step):
            return base
        lam_t = self.base.lam(step, torch.zeros((), dtype=torch.long)).item()
        w = self.weights().to(turn_idx.device)[turn_idx.clamp(0, self.horizon - 1).long()]
        return (lam_t * w).clamp(self.lambda_min, self._lambda_max).to(torch.float32)

    def lambda_turn(self, step: int, n_turns: int) -> list[float]:
        return self.lam(step, torch.arange(max(self.horizon, n_turns))).tolist()

    def observe(self, step: int, metrics: dict) -> None:
        self.base.observe(step, metrics)
        d_new, h_new = metrics.get("turn_distill"), metrics.get("turn_teacher_entropy")
        if d_new is None or h_new is None:  # a skipped step (no teacher scores) has no statistics
            return
        buckets = _fold(d_new, h_new, self.horizon)
        for i, (d, h) in enumerate(buckets):
            if d is None:
                continue
            old_d, old_h = self.disagreement[i], self.teacher_entropy[i]
            a = self.ema
            self.disagreement[i] = d if old_d is None else a * old_d + (1 - a) * d
            self.teacher_entropy[i] = h if old_h is None else a * old_h + (1 - a) * h

    # A controller may act on the learning rate, the value warm-up and the log: the wrapped one decides.
    def lr_factor(self, step: int) -> float:
        f = getattr(self.base, "lr_factor", None)
        return 1.0 if f is None else f(step)

    def value_only(self, step: int) -> bool:
        f = getattr(self.base, "value_only", None)
        return False if f is None else f(step)

    def metrics(self) -> dict:
        extra = self.base.metrics() if hasattr(self.base, "metrics") else {}
        return {**extra, "turn_weights": [round(x, 6) for x in self.weights().tolist()]}

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "disagreement": list(self.disagreement),
                "teacher_entropy": list(self.teacher_entropy)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("disagreement", "teacher_entropy"):
            if len(state.get(key, [])) != self.horizon:
                raise ValueError(f"adaptive turn weights: the checkpoint holds {len(state.get(key, []))} turns of "
                                 f"{key}, this run has schedule.turn_horizon={self.horizon}")
        self.base.load_state_dict(state["base"])
        self.disagreement, self.teacher_entropy = list(state["disagreement"]), list(state["teacher_entropy"])


def _fold(distill: list, entropy: list, horizon: int) -> list[tuple[float | None, float | None]]:
    """Per-turn means (None where a turn had no token) folded into ``horizon`` buckets: turns ≥ horizon − 1 share the
    last one, each with equal weight (rare: the horizon is the turn limit unless schedule.turn_horizon is set)."""
    out: list[list[float]] = [[] for _ in range(horizon)]
    for i, (d, h) in enumerate(zip(distill, entropy, strict=True)):
        if d is None or h is None or not (math.isfinite(d) and math.isfinite(h)):
            continue
        out[min(i, horizon - 1)].append((d, h))
    return [(sum(x for x, _ in b) / len(b), sum(y for _, y in b) / len(b)) if b else (None, None) for b in out]
