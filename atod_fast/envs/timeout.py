"""A per-step time limit for environments that can hang (a JVM, a remote service): ``env.step_timeout_s``.

Python cannot interrupt a call that blocks in a socket read or in native code, so each call runs in a
daemon thread and the caller waits for it with a deadline. When the deadline passes, the episode
ends as failed (reward 0, ``info["timeout"]``) with a log line, and the stuck call is abandoned:
the wrapped environment is closed (``close()``, when it has one) and replaced by a fresh one at
the next ``reset``. Closing is what actually frees a hung call: the JVM-backed environments here
retire their Java process on ``close()`` during a call, which ends the blocked socket read once the
process is gone. A pure-Python step that loops forever keeps its daemon thread until the process
exits: nothing short of killing the process stops it, but training goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("atod_fast")


class StepTimeout(RuntimeError):
    """A call into the environment did not return within the limit."""


def call_with_deadline(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread; its result, its exception, or :class:`StepTimeout` after ``timeout_s``."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread as is
            box["error"] = e

    worker = threading.Thread(target=run, name=f"atod-env-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise StepTimeout(f"{what} did not return within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class TimedEnv:
    """Wraps an environment made by ``build()`` so that ``reset`` and ``step`` have a deadline.

    Every other attribute (``max_turns``, ``expert_action``, ...) is the wrapped environment's.
    """

    def __init__(self, build: Callable[[], Any], timeout_s: float, *, name: str = "env"):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be a number > 0, got {timeout_s!r}")
        self._build, self.timeout_s, self.name = build, float(timeout_s), name
        self.env = build()
        self._stale = False
        self._seed: int | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr == "env":  # not built yet: no recursion through __getattr__
            raise AttributeError(attr)
        return getattr(self.env, attr)

    def _abandon(self) -> None:
        self._stale = True
        close = getattr(self.env, "close", None)
        if close is not None:
            try:  # closing may itself hang on a dead backend: it gets the same deadline
                call_with_deadline(close, self.timeout_s, "close()")
            except Exception as e:
                log.warning("environment %s: close() after a timeout failed: %s", self.name, e)

    def reset(self, seed: int, **kw) -> str:
        if self._stale:
            self.env, self._stale = self._build(), False
        self._seed = seed
        try:
            return call_with_deadline(lambda: self.env.reset(seed, **kw), self.timeout_s, "reset()")
        except StepTimeout:
            self._abandon()
        log.warning("environment %s: reset(%d) took over env.step_timeout_s=%gs; retrying once on a fresh one",
                    self.name, seed, self.timeout_s)
        self.env, self._stale = self._build(), False
        try:
            return call_with_deadline(lambda: self.env.reset(seed, **kw), self.timeout_s, "reset()")
        except StepTimeout:
            self._abandon()
            raise StepTimeout(f"env.step_timeout_s: environment {self.name} did not finish reset({seed}) within "
                              f"{self.timeout_s:g}s twice") from None

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._stale:
            raise RuntimeError("step() called on an episode that ended by a timeout; call reset() first")
        try:
            return call_with_deadline(lambda: self.env.step(action), self.timeout_s, "step()")
        except StepTimeout:
            pass
        log.warning("environment %s: step() on seed %s took over env.step_timeout_s=%gs; the episode ends as failed",
                    self.name, self._seed, self.timeout_s)
        self._abandon()
        obs = f"The environment did not answer within {self.timeout_s:g}s; the episode ends."
        return obs, 0.0, True, {"success": False, "invalid": False, "timeout": True}
