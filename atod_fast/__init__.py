"""atod-fast: Annealed Turn-aware On-policy Distillation for multi-turn LLM agents."""

from ._version import __version__
from .losses import AtodLossOutput, atod_loss
from .schedule import AnnealSchedule

__all__ = ["AnnealSchedule", "AtodLossOutput", "__version__", "atod_loss"]
