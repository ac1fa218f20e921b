"""Guess the number: find a secret integer in [low, high] from "higher"/"lower" hints.

Reward 1.0 when the agent names the secret within ``max_turns`` guesses, else 0. A reply
counts as a guess when it contains an integer (the first one is used); anything else is an
invalid move that uses up the turn and is answered with the expected format.

The scripted expert bisects the interval that the hints so far leave open, which needs at
most ⌈log2(high − low + 2)⌉ guesses. With ``expert_error_rate`` > 0 it instead guesses a
uniformly random number of that interval with that probability: still consistent with
every hint, but slower, so a turn limit near the bisection bound makes it fail sometimes.
"""

from __future__ import annotations

import random
import re
from typing import Any

from .base import register

_INT = re.compile(r"-?\d+")


class GuessNumberEnv:
    """Guess-the-number with a turn limit; see the module docstring."""

    def __init__(self, *, low: int = 1, high: int = 16, max_turns: int = 5, expert_error_rate: float = 0.0):
        if not isinstance(low, int) or not isinstance(high, int) or high <= low:
            raise ValueError(f"low and high must be integers with low < high, got low={low!r}, high={high!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        if not 0.0 <= expert_error_rate <= 1.0:
            raise ValueError(f"expert_error_rate must be in [0, 1], got {expert_error_rate!r}")
        self.low, self.high, self.max_turns = low, high, max_turns
        self.expert_error_rate = expert_error_rate
        self._secret: int | None = None
        self._done = True

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self._secret = rng.randint(self.low, self.high)
        # A separate stream for the expert's mistakes, so they never change the secret.
        self._expert_rng = random.Random(rng.getrandbits(64))
        self._lo, self._hi = self.low, self.high
        self._turn = 0
        self._done = False
        return f"Guess the number between {self.low} and {self.high}. You have {self.max_turns} guesses."

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._turn += 1
        last = self._turn >= self.max_turns
        m = _INT.search(action)
        guess = int(m.group()) if m else None
        if guess is None or not self.low <= guess <= self.high:
            why = "no number found" if guess is None else f"{guess} is out of range"
            obs = f"Invalid guess ({why}): reply with one number between {self.low} and {self.high}."
            return self._end_or(obs, last, invalid=True)
        if guess == self._secret:
            self._done = True
            return f"Correct, it was {guess}.", 1.0, True, {"success": True, "invalid": False, "turns": self._turn}
        if guess < self._secret:
            self._lo = max(self._lo, guess + 1)
            obs = "Higher."
        else:
            self._hi = min(self._hi, guess - 1)
            obs = "Lower."
        return self._end_or(obs, last, invalid=False)

    def _end_or(self, obs: str, last: bool, *, invalid: bool):
        if last:
            self._done = True
            obs = f"{obs} Out of guesses, it was {self._secret}."
            return obs, 0.0, True, {"success": False, "invalid": invalid, "turns": self._turn}
        return obs, 0.0, False, {"invalid": invalid}

    def expert_action(self) -> str:
        if self._done:
            raise RuntimeError("expert_action() called on a finished episode")
        if self.expert_error_rate > 0 and self._expert_rng.random() < self.expert_error_rate:
            return str(self._expert_rng.randint(self._lo, self._hi))
        return str((self._lo + self._hi) // 2)


register("guess_number", GuessNumberEnv, "find a secret number from higher/lower hints within a turn limit")
