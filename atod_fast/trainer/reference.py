"""Log-probs of the sampled tokens from a model's hidden states, and the KL reference that needs them.

``token_logprobs`` is how the trainer gets log π(token) for a whole batch: the project's
``fused_logprobs_entropy`` over the LM head, never a ``[N, V]`` logits tensor. The student's
old log-probs (the PPO ratio's denominator) and the reference's log-probs (the k3 KL penalty,
``loss.kl_coef > 0``) both come from it. :class:`ReferenceScorer` owns the frozen reference.
"""

from __future__ import annotations

import torch

from ..ops.losses import fused_logprobs_entropy
from .batch import StepBatch
from .models import lm_head


def token_logprobs(lm, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                   vocab_size: int | None, backend: str) -> torch.Tensor:
    """``[A]`` float32 log-softmax(head(hidden) / temperature)[targets] over the head's first ``vocab_size`` rows.

    ``backend``: the loss's (``loss.backend``), so that the PPO ratio's denominator comes from the same
    kernel as its numerator.
    """
    w, b = lm_head(lm)
    n = vocab_size or w.shape[0]
    lp, _ = fused_logprobs_entropy(hidden, w[:n], targets, bias=None if b is None else b[:n],
                                   temperature=temperature, backend=backend)
    return lp


class ReferenceScorer:
    """The frozen reference policy of the KL penalty: ``{"ref_logprobs": [A]}`` for a step batch."""

    def __init__(self, model, *, packing: str, temperature: float, vocab_size: int | None, backend: str):
        self.model, self.packing = model, packing
        self.kw = dict(temperature=temperature, vocab_size=vocab_size, backend=backend)

    @torch.no_grad()
    def score(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        h = batch.hidden(self.model, packing=self.packing)[batch.agent_rows]
        return {"ref_logprobs": token_logprobs(self.model, h, batch.targets, **self.kw)}
