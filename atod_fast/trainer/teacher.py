"""The teacher scorer: what the distillation term of ``atod_loss`` needs to know about the teacher.

A :class:`TeacherScorer` looks at the step's :class:`StepBatch` once, before the PPO epochs,
and returns per agent row a dict of tensors named as ``atod_loss``'s keyword arguments:

- dense: ``{"teacher_hidden": [A, Ht]}``, with ``head()`` giving ``(teacher_weight, teacher_bias)``;
- sparse: ``{"teacher_topk_ids": [A, k], "teacher_topk_logprobs": [A, k]}``, ``head()`` → ``(None, None)``;
- sampled token only (``loss.divergence=sampled_reverse_kl``): ``{"teacher_logprobs": [A]}``, the teacher's
  log-prob of each row's target at the loss temperature; ``head()`` → ``(None, None)``.

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
from .reference import token_logprobs

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

    ``sampled``: score the sampled tokens alone (``teacher_logprobs``, for ``sampled_reverse_kl``) with
    ``temperature``, ``vocab_size`` and ``backend`` as the loss's; otherwise the dense teacher.
    """

    def __init__(self, model, *, packing: str, gather=None, sampled: bool = False, temperature: float = 1.0,
                 vocab_size: int | None = None, backend: str = "auto"):
        self.model, self.packing, self._gather = model, packing, gather
        self.sampled, self.temperature, self.vocab_size, self.backend = sampled, temperature, vocab_size, backend

    @torch.no_grad()
    def score(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        h = batch.hidden(self.model, packing=self.packing)[batch.agent_rows]
        if not self.sampled:
            return {"teacher_hidden": h}
        with self.gathered():
            lp = token_logprobs(self.model, h, batch.targets, temperature=self.temperature,
                                vocab_size=self.vocab_size, backend=self.backend)
        return {"teacher_logprobs": lp}

    def head(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.sampled else lm_head(self.model)

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self._gather is None else self._gather(lm_head(self.model))


def make_teacher(cfg, models, *, lambda_max: float, gather=None, vocab_size: int | None = None) -> TeacherScorer | None:
    """The run's teacher scorer: a served one (``model.teacher_server``), the local teacher model, or none (no
    teacher, or λ never above 0)."""
    if lambda_max <= 0:
        return None
    if cfg.model.teacher_server is not None:
        from .served_teacher import probe_text, served_teacher

        return served_teacher(cfg, models.tokenizer, probe_text(models.tokenizer))
    if models.teacher is None:
        return None
    return LocalTeacher(models.teacher, packing=cfg.model.packing, gather=gather,
                        sampled=cfg.loss.divergence == "sampled_reverse_kl", temperature=cfg.loss.temperature,
                        vocab_size=vocab_size, backend=cfg.loss.backend)


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
