"""Multi-turn text environments: protocol, registry and the built-in tasks."""

from .base import Env, ExpertEnv, make, register, registered

__all__ = ["Env", "ExpertEnv", "make", "register", "registered"]
