"""Multi-turn text environments: protocol, registry and the built-in tasks."""

from . import guess_number, hanoi, textarena_env  # noqa: F401  (register the built-ins)
from .base import Env, ExpertEnv, make, register, registered
from .guess_number import GuessNumberEnv
from .hanoi import HanoiEnv
from .textarena_env import TextArenaEnv

__all__ = ["Env", "ExpertEnv", "GuessNumberEnv", "HanoiEnv", "TextArenaEnv", "make", "register", "registered"]
