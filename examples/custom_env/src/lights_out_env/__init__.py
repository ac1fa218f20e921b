"""Switch off a row of lights: an example environment for atod-fast, in a package of its own.

The game: ``n`` lights in a row, some on. The action ``toggle K`` flips light K and its neighbours.
The episode is won (reward 1) when every light is off, and lost (reward 0) after ``max_turns``
turns. A reply that names no light in range is an invalid move: it uses up the turn and the
observation says what was expected.

What atod-fast needs from an environment is only this shape: ``max_turns``, ``reset(seed) -> str``
and ``step(action) -> (observation, reward, done, info)``, with ``info["success"]`` when done and
``info["invalid"]`` for a move it could not use. An ``expert_action()`` and an ``expert_error_rate``
keyword let ``model.teacher=builtin`` train a teacher on the expert's demonstrations.
"""

from __future__ import annotations

import random

__all__ = ["LightsOutEnv"]


def _press(lights: list[int], k: int) -> None:
    for j in (k - 1, k, k + 1):
        if 0 <= j < len(lights):
            lights[j] ^= 1


def _solution(lights: list[int]) -> list[int]:
    """A shortest set of lights to toggle. Once the first light's press is chosen the rest is forced (light K-1
    can only still be switched off by toggling K), so the shorter of the two choices that clear the row wins."""
    found = []
    for first in (0, 1):
        work, presses = list(lights), [0] * first
        if first:
            _press(work, 0)
        for k in range(1, len(work)):
            if work[k - 1]:
                _press(work, k)
                presses.append(k)
        if not any(work):
            found.append(presses)
    return min(found, key=len)


class LightsOutEnv:
    """Switch off a row of lights by toggling one light (and its neighbours) per turn."""

    def __init__(self, *, n: int = 5, max_turns: int = 4, expert_error_rate: float = 0.0):
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an integer >= 2, got {n!r}")
        self.n, self.max_turns, self.expert_error_rate = n, max_turns, expert_error_rate

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self.lights = [0] * self.n
        for k in rng.sample(range(self.n), rng.randint(1, 2)):  # a few presses from "all off": always solvable
            _press(self.lights, k)
        if not any(self.lights):
            _press(self.lights, 0)
        self._expert_rng = random.Random(rng.getrandbits(64))
        self.turn = 0
        return (f"Lights 1 to {self.n}: {self._show()}. Reply 'toggle K' to flip light K and its neighbours; "
                f"switch every light off within {self.max_turns} turns.")

    def _show(self) -> str:
        return " ".join("on" if x else "off" for x in self.lights)

    def step(self, action: str):
        self.turn += 1
        words = action.lower().split()
        k = int(words[-1]) - 1 if len(words) == 2 and words[0] == "toggle" and words[1].isdigit() else -1
        invalid = not 0 <= k < self.n
        if invalid:
            obs = f"Invalid move: reply 'toggle K' with K between 1 and {self.n}."
        else:
            _press(self.lights, k)
            obs = f"Lights: {self._show()}."
        if not any(self.lights):
            return "All lights are off. You win.", 1.0, True, {"success": True, "invalid": invalid}
        if self.turn >= self.max_turns:
            return obs + " Out of turns.", 0.0, True, {"success": False, "invalid": invalid}
        return obs, 0.0, False, {"invalid": invalid}

    def expert_action(self) -> str:
        """The next press of a shortest solution; with probability expert_error_rate a random light."""
        if self._expert_rng.random() < self.expert_error_rate:
            return f"toggle {self._expert_rng.randint(1, self.n)}"
        return f"toggle {_solution(self.lights)[0] + 1}"
