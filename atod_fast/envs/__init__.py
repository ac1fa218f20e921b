"""Multi-turn text environments: protocol, registry and the built-in tasks."""

from . import guess_number, hanoi, scienceworld_env, textarena_env, textworld_express_env  # noqa: F401  (register)
from .base import (
    ENTRY_POINT_GROUP,
    Env,
    EnvSpecError,
    ExpertEnv,
    available,
    make,
    register,
    registered,
    resolve,
    split_of,
)
from .guess_number import GuessNumberEnv
from .hanoi import HanoiEnv
from .textarena_env import TextArenaEnv
from .timeout import StepTimeout, TimedEnv

__all__ = ["ENTRY_POINT_GROUP", "Env", "EnvSpecError", "ExpertEnv", "GuessNumberEnv", "HanoiEnv", "StepTimeout",
           "TextArenaEnv", "TimedEnv", "available", "make", "register", "registered", "resolve", "split_of"]
