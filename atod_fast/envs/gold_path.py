"""Shared parts of the Java text-game adapters: action matching, the gold-path expert, the JVM check."""

from __future__ import annotations

import random
import re
import shutil

HARMLESS = ("look around", "inventory")
"""Actions that change nothing in the game: the erring expert spends its mistaken turns on them."""


def normalize(action: str) -> str:
    """The agent's text as the games spell actions: one line, lower case, single spaces, no final period."""
    line = action.strip().splitlines()[0] if action.strip() else ""
    return re.sub(r"\s+", " ", line.strip().lower()).rstrip(".!").strip()


def need_java(what: str) -> None:
    if shutil.which("java") is None:
        raise RuntimeError(f"{what} needs Java >= 11 on PATH (e.g. apt-get install openjdk-17-jre-headless)")


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"expert_error_rate must be in [0, 1], got {rate!r}")
    return float(rate)


def check_turns(max_turns) -> int:
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
    return max_turns


class GoldPathExpert:
    """Follows the game's gold action sequence; with probability ``error_rate`` it spends the turn on a
    harmless action instead (one the game offers), so the gold path stays valid but takes longer."""

    def __init__(self, gold: list[str], error_rate: float, seed: int):
        self.gold, self.error_rate, self.pos = [normalize(a) for a in gold], error_rate, 0
        self.rng = random.Random(seed ^ 0x60_1D)  # its own stream: the game's episode never depends on it

    def action(self, harmless: list[str]) -> str:
        if self.error_rate > 0 and harmless and self.rng.random() < self.error_rate:
            return self.rng.choice(harmless)
        return self.gold[self.pos] if self.pos < len(self.gold) else (harmless or ["look around"])[0]

    def observe(self, action: str) -> None:
        """Advance along the gold path when ``action`` is its next step."""
        if self.pos < len(self.gold) and action == self.gold[self.pos]:
            self.pos += 1
