"""The teacher scorer: what the distillation term of ``atod_loss`` needs to know about the teacher.

A :class:`TeacherScorer` looks at the step's :class:`StepBatch` once, before the PPO epochs,
and returns per agent row a dict of tensors named as ``atod_loss``'s keyword arguments:

- dense: ``{"teacher_hidden": [A, Ht]}``, with ``head()`` giving ``(teacher_weight, teacher_bias)``;
- sparse: ``{"teacher_topk_ids": [A, k], "teacher_topk_logprobs": [A, k]}``, ``head()`` → ``(None, None)``;
- sampled token only: ``{"teacher_logprobs": [A]}`` (once ``atod_loss`` takes that input).

The learner slices every entry by rows for its minibatches and passes them to the loss by
name; it enters ``gathered()`` around each minibatch's forward and backward (a teacher whose
head is sharded materializes it there). :class:`LocalTeacher` is a teacher model in this process.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol, runtime_checkable

import torch

from .batch import StepBatch
from .models import lm_head

log = logging.getLogger("atod_fast")


@runtime_checkable
class TeacherScorer(Protocol):
    def score(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Per agent row of ``batch``, the loss's teacher inputs by name (first dimension A)."""
        ...

    def head(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(teacher_weight, teacher_bias)`` for dense scores; ``(None, None)`` otherwise."""
        ...

    def gathered(self) -> contextlib.AbstractContextManager:
        """Held around each minibatch's loss forward and backward (a sharded head is gathered in it)."""
        ...


class LocalTeacher:
    """A frozen causal LM in this process: its last hidden states on agent rows, and its LM head.

    ``gather``: the engine's context that materializes ZeRO-3-sharded parameters; given when the
    teacher is sharded over the ranks (``distributed.teacher_zero3``).
    """

    def __init__(self, model, *, packing: str, gather=None):
        self.model, self.packing, self._gather = model, packing, gather

    @torch.no_grad()
    def score(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        return {"teacher_hidden": batch.hidden(self.model, packing=self.packing)[batch.agent_rows]}

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return lm_head(self.model)

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self._gather is None else self._gather(self.head())


def make_teacher(cfg, models, *, lambda_max: float, gather=None) -> TeacherScorer | None:
    """The run's teacher scorer: a served one (``model.teacher_server``), the local teacher model, or none (no
    teacher, or λ never above 0)."""
    if lambda_max <= 0:
        return None
    if cfg.model.teacher_server is not None:
        from .served_teacher import probe_text, served_teacher

        return served_teacher(cfg, models.tokenizer, probe_text(models.tokenizer))
    if models.teacher is None:
        return None
    return LocalTeacher(models.teacher, packing=cfg.model.packing, gather=gather)


def score_rows(batch: StepBatch, scorers, dist, step: int) -> dict[str, torch.Tensor] | None:
    """Every scorer's rows of ``batch``; None on every rank when a teacher server failed on any of them (the step is
    then skipped: its rollouts are dropped and nothing is updated)."""
    from .served_teacher import TeacherUnavailable

    rows, failed = {}, None
    for scorer in scorers:
        if scorer is not None and failed is None:
            try:
                rows.update(scorer.score(batch))
            except TeacherUnavailable as e:
                failed = e
    if dist.any(failed is not None):  # every rank skips together: the update is collective
        if dist.is_main:
            log.warning("step %d: the teacher server failed (%s); step skipped, the run goes on", step,
                        failed or "on another rank")
        return None
    return rows
