"""atod-fast: Annealed Turn-aware On-policy Distillation for multi-turn LLM agents."""

from ._version import __version__
from .gae import compute_gae, group_advantages, masked_whiten, turn_rewards_to_tokens
from .losses import AtodLossOutput, atod_loss
from .schedule import AnnealSchedule

__all__ = ["AnnealSchedule", "AtodLossOutput", "__version__", "atod_loss", "compute_gae", "group_advantages",
           "masked_whiten", "turn_rewards_to_tokens"]
