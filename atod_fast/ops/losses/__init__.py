"""The ATOD objective: public API and implementations (reference and fused)."""

from .api import AtodLossOutput, atod_loss
from .logprobs import fused_logprobs_entropy
from .module import AtodLoss

__all__ = ["AtodLoss", "AtodLossOutput", "atod_loss", "fused_logprobs_entropy"]
