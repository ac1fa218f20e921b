"""atod-fast: Annealed Turn-aware On-policy Distillation for multi-turn LLM agents."""

from ._version import __version__
from .losses import AtodLoss, AtodLossOutput, atod_loss, fused_logprobs_entropy
from .schedule import AnnealSchedule

__all__ = ["AnnealSchedule", "AtodLoss", "AtodLossOutput", "__version__", "atod_loss", "fused_logprobs_entropy"]
