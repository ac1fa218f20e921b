"""atod-fast: Annealed Turn-aware On-policy Distillation for multi-turn LLM agents."""

from ._version import __version__
from .ops.gae import compute_gae, group_advantages, masked_whiten, turn_rewards_to_tokens
from .ops.losses import AtodLoss, AtodLossOutput, atod_loss, fused_logprobs_entropy
from .ops.schedule import AnnealSchedule

__all__ = [
    "AnnealSchedule",
    "AtodLoss",
    "AtodLossOutput",
    "__version__",
    "atod_loss",
    "compute_gae",
    "fused_logprobs_entropy",
    "group_advantages",
    "masked_whiten",
    "turn_rewards_to_tokens",
]
