"""GAE over packed multi-turn trajectories and the advantage utilities around it."""

from .api import BACKENDS, compute_gae
from .helpers import group_advantages, masked_whiten, turn_rewards_to_tokens
from .reference import gae_reference

__all__ = ["BACKENDS", "compute_gae", "gae_reference", "group_advantages", "masked_whiten",
           "turn_rewards_to_tokens"]
