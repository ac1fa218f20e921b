"""``AtodLoss``: the functional ``atod_loss`` as an ``nn.Module`` holding its hyperparameters."""

from __future__ import annotations

import torch
from torch import nn

from .api import BACKENDS, AtodLossOutput, atod_loss

HYPERPARAMETERS = ("divergence", "jsd_beta", "temperature", "clip_eps_low", "clip_eps_high", "dual_clip",
                   "kl_coef", "entropy_coef", "vocab_size", "backend", "chunk_size")
"""Keywords of ``atod_loss`` that an ``AtodLoss`` fixes at construction."""


class AtodLoss(nn.Module):
    """``AtodLoss(divergence="reverse_kl", kl_coef=0.05, ...)(student_hidden, student_weight, ...)``.

    Holds the scalar hyperparameters of :func:`atod_fast.atod_loss` (any of ``HYPERPARAMETERS``);
    ``forward`` takes the tensors, positional and keyword, exactly as ``atod_loss`` does, and
    returns its :class:`AtodLossOutput`. No parameters, no state: safe under DDP/FSDP.
    """

    def __init__(self, **hyperparameters):
        super().__init__()
        unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"AtodLoss got unknown hyperparameter(s) {unknown}; "
                             f"expected any of {list(HYPERPARAMETERS)}")
        if hyperparameters.get("backend", "auto") not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {hyperparameters['backend']!r}")
        self.hyperparameters = dict(hyperparameters)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
                old_logprobs: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                lam: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                **tensors) -> AtodLossOutput:
        clash = sorted(set(tensors) & set(HYPERPARAMETERS))
        if clash:
            raise ValueError(f"{clash} are fixed at AtodLoss construction; pass tensors only to forward")
        return atod_loss(student_hidden, student_weight, target_ids, old_logprobs, advantages, lam, loss_mask,
                         **tensors, **self.hyperparameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
