"""The environment protocol and registry.

An environment is a text game played over several turns::

    obs = env.reset(seed)                       # task description + first observation
    obs, reward, done, info = env.step(action)  # action: the agent's text for this turn

Rewards are sparse (typically 1.0 on success at the end). ``info`` carries at least
``success`` (bool) once ``done`` is True, and ``invalid`` (bool) when the action could not be
parsed; a malformed action gets an explanatory observation, never an exception.

Every built-in environment also has a scripted expert, ``env.expert_action()``, which
returns the expert's action for the current state using only what the agent could know
from the observations so far. Experts make the SFT data behind the built-in teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Env(Protocol):
    """What the trainer needs from an environment."""

    max_turns: int
    """Upper bound on the number of agent turns in one episode."""

    def reset(self, seed: int) -> str:
        """Start a new episode, deterministic in ``seed``; return the first observation."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply the agent's action; return (observation, reward, done, info)."""
        ...


@runtime_checkable
class ExpertEnv(Env, Protocol):
    """An environment with a scripted expert policy."""

    def expert_action(self) -> str:
        """The expert's action in the current state."""
        ...


_REGISTRY: dict[str, tuple[Callable[..., Env], str]] = {}


def register(name: str, factory: Callable[..., Env], description: str = "") -> None:
    """Register ``factory(**kwargs) -> Env`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"environment {name!r} is already registered")
    _REGISTRY[name] = (factory, description)


def make(name: str, **kwargs) -> Env:
    """Build a registered environment by name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0](**kwargs)


def registered() -> dict[str, str]:
    """Registered environment names with their one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}
