"""The ATOD objective: public API and implementations (reference and fused)."""

from .api import AtodLossOutput, atod_loss

__all__ = ["AtodLossOutput", "atod_loss"]
