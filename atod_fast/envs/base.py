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


# The trainer's seed spaces (atod_fast.trainer.seeds) carry the split an episode belongs to, so that an
# environment with its own folds (TextWorldExpress, ScienceWorld) can pick the matching one from the seed.
EVAL_BASE = 1 << 40
"""Held-out evaluation seeds start here (test split); training seeds lie below."""
DEV_BASE = EVAL_BASE + (1 << 39)
"""Seeds for selection (dev split) start here."""
DEMO_BASE = 1 << 41
"""Seeds of the expert's SFT demonstrations start here (train split, like training episodes)."""


def split_of(seed: int) -> tuple[str, int]:
    """(split, index) of a trainer seed: split "train" (training episodes, demonstrations), "dev" or "test"
    (held-out); index counts from the start of the seed's range (eval seed ``EVAL_BASE + i`` has index i)."""
    if EVAL_BASE <= seed < DEV_BASE:
        return "test", seed - EVAL_BASE
    if DEV_BASE <= seed < DEMO_BASE:
        return "dev", seed - DEV_BASE
    return "train", seed - DEMO_BASE if seed >= DEMO_BASE else seed


_REGISTRY: dict[str, tuple[Callable[..., Env], str, str | None]] = {}
ENTRY_POINT_GROUP = "atod_fast.envs"
_REQUIRED = ("reset", "step", "max_turns")


class EnvSpecError(ValueError):
    """``env.name`` names nothing usable as an environment; the message is one line naming it."""


def register(name: str, factory: Callable[..., Env], description: str = "", *, package: str | None = None) -> None:
    """Register ``factory(**kwargs) -> Env`` under ``name``; ``package``: the module an adapter wraps."""
    if name in _REGISTRY:
        raise ValueError(f"environment {name!r} is already registered")
    _REGISTRY[name] = (factory, description, package)


def _entry_points():
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _describe(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _import_target(name: str, spec: str) -> Any:
    """The object ``spec`` (``package.module:Attr.sub``) names; an EnvSpecError naming ``name`` otherwise."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EnvSpecError(f"env.name={name!r}: expected package.module:ClassOrFactory")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it loads
        raise EnvSpecError(f"env.name={name!r}: module {module_name!r} cannot be imported "
                           f"({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EnvSpecError(f"env.name={name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EnvSpecError(f"env.name={name!r}: {attr!r} is not a class or factory (got {type(obj).__name__})")
    return obj


def resolve(name: str) -> tuple[Callable[..., Env], str]:
    """(factory, kind) for ``name``: a registered name, an entry point of ``atod_fast.envs``, or ``module:Attr``.

    Raises :class:`EnvSpecError` with one line naming ``name`` and what is missing.
    """
    if not isinstance(name, str) or not name:
        raise EnvSpecError(f"env.name: expected an environment name, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name][0], "built-in"
    if ":" in name:
        return _import_target(name, name), "module"
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as e:  # a broken plugin: name it, not a traceback from deep inside importlib
            raise EnvSpecError(f"env.name={name!r}: entry point {eps[name].value!r} of group "
                               f"{ENTRY_POINT_GROUP} cannot be loaded ({type(e).__name__}: {e})") from None
        return obj, "entry point"
    known = sorted({*_REGISTRY, *eps})
    raise EnvSpecError(f"env.name: unknown environment {name!r}; expected one of {known}, an entry point of group "
                       f"{ENTRY_POINT_GROUP}, or package.module:ClassOrFactory")


def check_env(name: str, env: Any) -> Any:
    """``env`` if it has what the trainer needs; an EnvSpecError naming ``name`` and what is missing."""
    missing = [a for a in _REQUIRED if not hasattr(env, a)]
    if missing:
        raise EnvSpecError(f"env.name={name!r}: the object it makes ({type(env).__name__}) has no "
                           f"{', '.join(missing)} (an environment needs reset, step and max_turns)")
    return env


def make(name: str, /, *, step_timeout_s: float | None = None, **kwargs) -> Env:
    """Build an environment: a registered name, an entry point of ``atod_fast.envs``, or ``package.module:Attr``.

    ``step_timeout_s`` wraps it in :class:`~atod_fast.envs.timeout.TimedEnv`: a step that runs longer ends
    its episode as failed.
    """
    factory, _ = resolve(name)

    def build() -> Env:
        return check_env(name, factory(**kwargs))

    if step_timeout_s is None:
        return build()
    from .timeout import TimedEnv

    return TimedEnv(build, step_timeout_s, name=name)


def registered() -> dict[str, str]:
    """Registered environment names with their one-line descriptions."""
    return {name: desc for name, (_, desc, _) in sorted(_REGISTRY.items())}


def available() -> list[tuple[str, str, str]]:
    """(name, kind, description) of every environment ``make`` finds by name: built-in and adapters, then
    entry points.

    Adapters (``module:Class`` names) are found by import and need no listing.
    """
    import importlib.util

    rows = []
    for n, (_, desc, package) in sorted(_REGISTRY.items()):
        if package is None:
            rows.append((n, "built-in", desc))
        else:
            there = importlib.util.find_spec(package) is not None
            rows.append((n, "adapter" if there else f"adapter, needs {package}", desc))
    for n, ep in sorted(_entry_points().items()):
        if n in _REGISTRY:
            continue
        try:
            desc = _describe(ep.load())
        except Exception as e:  # list the broken plugin with its error rather than hide it
            desc = f"(cannot be loaded: {type(e).__name__}: {e})"
        rows.append((n, "entry point", desc or ep.value))
    return rows
