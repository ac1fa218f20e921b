"""Progress-gated hand-over (``schedule.handover=auto``): distil until the student has caught up, then anneal.

Rule (see docs/handover.md): λ = ``lambda_max`` on every token until the gate opens. The gate is
judged after each step on training episodes only, from the mean over the last ``gate_window``
steps of

- ``success_rate`` (the step's training episodes): open when it is ≥ ``gate_ratio`` × the
  teacher's success on training-distribution episodes (measured once, :mod:`.teacher_success`);
- ``distill`` (the masked mean per-token divergence of the step), when ``gate_divergence`` is set:
  open when it is < ``gate_divergence``.

Either condition opens the gate; ``handover_step`` is the step after which it opened. From then
on the learning rate is scaled by ``optim.handover_lr_scale``, the next ``ppo.value_warmup_steps``
steps train the value head alone, and λ follows an :class:`AnnealSchedule` of ``anneal_steps``
steps (null: the steps left in the run) started at the first step after the warm-up.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch

from ..ops.schedule import AnnealSchedule

log = logging.getLogger("atod_fast")


class HandoverController:
    """λ(step, turn) that holds at ``lambda_max`` until a progress gate opens, then anneals.

    ``step`` is the 1-based training step being run; ``observe(step, stats)`` takes the finished
    step's metrics. All state (the gate's window and ``handover_step``) is in ``state_dict()``,
    plain JSON, so a resumed run opens the gate at the same step as an uninterrupted one.
    """

    def __init__(self, *, turn_horizon: int, max_steps: int, teacher_success: float, lambda_max: float = 0.9,
                 lambda_min: float = 0.1, time_decay: str = "cosine", turn_decay: str = "cosine",
                 anneal_steps: int | None = None, gate_window: int = 10, gate_ratio: float = 1.0,
                 gate_divergence: float | None = None, lr_scale: float = 1.0, value_warmup_steps: int = 0):
        if not 0.0 <= teacher_success <= 1.0 or not math.isfinite(teacher_success):
            raise ValueError(f"teacher_success must be a number in [0, 1], got {teacher_success!r}")
        if gate_window < 1:
            raise ValueError(f"gate_window must be >= 1, got {gate_window!r}")
        AnnealSchedule(1, turn_horizon, lambda_max=lambda_max, lambda_min=lambda_min, time_decay=time_decay,
                       turn_decay=turn_decay)  # validates the λ settings now, not at the gate
        self.turn_horizon, self.max_steps = turn_horizon, max_steps
        self.lambda_max, self.lambda_min = lambda_max, lambda_min
        self.time_decay, self.turn_decay = time_decay, turn_decay
        self.anneal_steps, self.gate_window, self.gate_ratio = anneal_steps, gate_window, gate_ratio
        self.gate_divergence, self.lr_scale = gate_divergence, lr_scale
        self.value_warmup_steps, self.teacher_success = value_warmup_steps, teacher_success
        self.handover_step: int | None = None
        self._success: deque[float] = deque(maxlen=gate_window)
        self._distill: deque[float] = deque(maxlen=gate_window)

    # ----------------------------------------------------------------- the gate
    @property
    def threshold(self) -> float:
        """Training success the student's window mean must reach."""
        return self.gate_ratio * self.teacher_success

    def observe(self, step: int, stats: dict) -> None:
        """Feed the finished step's metrics (``success_rate``, ``distill``); may open the gate."""
        if self.handover_step is not None:
            return
        self._success.append(float(stats["success_rate"]))
        d = float(stats.get("distill", float("nan")))
        self._distill.append(d)
        if len(self._success) < self.gate_window:
            return
        caught_up = sum(self._success) / self.gate_window >= self.threshold
        close = False
        if self.gate_divergence is not None and all(math.isfinite(x) for x in self._distill):
            close = sum(self._distill) / self.gate_window < self.gate_divergence
        if caught_up or close:
            self.handover_step = step

    # ----------------------------------------------------------------- what the gate changes
    def anneal_start(self) -> int | None:
        """First step of the anneal (t = 0), after the value warm-up; None before the gate."""
        if self.handover_step is None:
            return None
        return self.handover_step + self.value_warmup_steps + 1

    def schedule(self) -> AnnealSchedule | None:
        start = self.anneal_start()
        if start is None:
            return None
        total = self.anneal_steps or max(self.max_steps - start + 1, 1)
        return AnnealSchedule(total, self.turn_horizon, lambda_max=self.lambda_max, lambda_min=self.lambda_min,
                              time_decay=self.time_decay, turn_decay=self.turn_decay)

    def holding(self, step: int) -> bool:
        """True while λ holds at lambda_max: before the gate and through the value warm-up."""
        start = self.anneal_start()
        return start is None or step < start

    def lam(self, step: int, turn_idx: torch.Tensor) -> torch.Tensor:
        """λ per token of training step ``step`` (1-based) at turn indices ``turn_idx``."""
        turn_idx = torch.as_tensor(turn_idx)
        if self.holding(step):
            return torch.full(turn_idx.shape, self.lambda_max, dtype=torch.float32, device=turn_idx.device)
        return self.schedule()(step - self.anneal_start(), turn_idx)

    def lambda_turn(self, step: int, n_turns: int) -> list[float]:
        """λ of turns 0 .. max(turn_horizon, n_turns) − 1 at ``step`` (the ``lambda_turn`` metric)."""
        return self.lam(step, torch.arange(max(self.turn_horizon, n_turns))).tolist()

    def value_only(self, step: int) -> bool:
        """True on the value head's warm-up steps: the policy loss is off, the value loss alone trains."""
        h = self.handover_step
        return h is not None and h < step <= h + self.value_warmup_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate of training step ``step`` (1-based)."""
        return self.lr_scale if self.handover_step is not None and step > self.handover_step else 1.0

    def metrics(self) -> dict:
        """Per-step log fields: the gate step (null until it opens) and the student's window mean."""
        window = sum(self._success) / len(self._success) if self._success else float("nan")
        return {"handover_step": self.handover_step, "gate_success": window, "gate_threshold": self.threshold}

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"handover_step": self.handover_step, "success": list(self._success),
                "distill": [x if math.isfinite(x) else None for x in self._distill],
                "teacher_success": self.teacher_success}

    def load_state_dict(self, state: dict) -> None:
        self.handover_step = state["handover_step"]
        self._success = deque(state["success"], maxlen=self.gate_window)
        self._distill = deque((float("nan") if x is None else x for x in state["distill"]), maxlen=self.gate_window)
        # The threshold the run started with: a re-measured (e.g. rebuilt) teacher must not move a resumed gate.
        self.teacher_success = state["teacher_success"]



# ----------------------------------------------------------------- the trainer's side
def make_controller(cfg, models, *, max_turns: int, teacher_path: str | None, dist, device: torch.device):
    """The λ controller the config asks for: the hand-over (``schedule.handover=auto`` under ``mode=atod``; the
    teacher's bar is measured on rank 0 first, the other ranks read its cache) or the fixed schedule, under the
    adaptive turn weights with ``schedule.turn_weighting=adaptive``."""
    base = _base_controller(cfg, models, max_turns=max_turns, teacher_path=teacher_path, dist=dist, device=device)
    s = cfg.schedule
    if s.turn_weighting != "adaptive":
        return base
    from .turn_weights import AdaptiveTurnController

    return AdaptiveTurnController(base, turn_horizon=s.turn_horizon or max_turns, lambda_min=s.lambda_min,
                                  lambda_max=s.lambda_max, ema=s.turn_ema)


def _base_controller(cfg, models, *, max_turns: int, teacher_path: str | None, dist, device: torch.device):
    from .lam import ScheduleController, build_schedule

    if not cfg.gated:
        if cfg.schedule.mode == "atod" and cfg.schedule.handover == "auto" and dist.is_main:
            log.warning("schedule.handover=auto needs the teacher's own play for its gate, which a served teacher "
                        "(model.teacher_server) cannot give: λ anneals from step 0 (as schedule.handover=fixed)")
        return ScheduleController(build_schedule(cfg, max_turns))
    from .teacher_success import teacher_train_success

    with dist.main_first():
        bar = teacher_train_success(cfg, models.teacher, models.tokenizer, teacher_path, device)
    s = cfg.schedule
    return HandoverController(turn_horizon=s.turn_horizon or max_turns, max_steps=cfg.max_steps, teacher_success=bar,
                              lambda_max=s.lambda_max, lambda_min=s.lambda_min, time_decay=s.time_decay,
                              turn_decay=s.turn_decay, anneal_steps=s.anneal_steps, gate_window=s.gate_window,
                              gate_ratio=s.gate_ratio, gate_divergence=s.gate_divergence,
                              lr_scale=cfg.optim.handover_lr_scale, value_warmup_steps=cfg.ppo.value_warmup_steps)


# A λ controller may also act on the learning rate, the value warm-up and the log (the hand-over does); these
# read what it offers and default to nothing for those that do not.
def lr_factor(controller, step: int) -> float:
    f = getattr(controller, "lr_factor", None)
    return 1.0 if f is None else f(step)


def value_only(controller, step: int) -> bool:
    f = getattr(controller, "value_only", None)
    return False if f is None else f(step)


def after_observe(controller, learner) -> dict:
    """Once the controller has seen a step: its metrics, and the LR of the next step set again (the gate may
    have just scaled it), as logged fields."""
    learner.refresh_lr()
    extra = controller.metrics() if hasattr(controller, "metrics") else {}
    return {**extra, "lr": learner.scheduler.get_last_lr()[0]}
