"""Adapter for textarena's single-player games (``pip install "atod-fast[textarena]"``).

textarena returns the whole game log as each observation; the adapter passes on only
what is new since the last one, without the echo of the agent's own move, so that each
turn of the conversation carries just the game's reply. The reward is textarena's
player-0 reward, given when the game ends; ``success`` means that reward is positive.

textarena seeds Python's global ``random`` in ``reset``; the adapter restores the global
state afterwards so that it cannot disturb the trainer's own random streams.
"""

from __future__ import annotations

import random
from typing import Any

from .base import register


def _new_text(previous: str, current: str) -> str:
    text = current[len(previous):] if current.startswith(previous) else current
    lines = [ln for ln in text.splitlines() if not ln.startswith("[Player]")]
    return "\n".join(lines).strip()


class TextArenaEnv:
    """A textarena single-player game as an atod-fast environment."""

    def __init__(self, *, env_id: str = "GuessTheNumber-v0", max_turns: int = 20):
        try:
            import textarena
        except ImportError as e:
            raise ImportError(
                "the textarena environments need the textarena package: pip install 'atod-fast[textarena]'"
            ) from e
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        self._ta = textarena
        self.env_id, self.max_turns = env_id, max_turns
        self._env = None
        self._done = True

    def reset(self, seed: int) -> str:
        state = random.getstate()
        try:
            self._env = self._ta.make(self.env_id)
            self._env.reset(num_players=1, seed=seed)
        finally:
            random.setstate(state)
        _, obs = self._env.get_observation()
        self._seen = obs
        self._turn = 0
        self._done = False
        return obs.strip()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._turn += 1
        done, _ = self._env.step(action)
        if not done and self._turn < self.max_turns:
            _, obs = self._env.get_observation()
            new = _new_text(self._seen, obs)
            self._seen = obs
            return new, 0.0, False, {"invalid": "invalid" in new.lower()}
        self._done = True
        if not done:
            # Our turn limit ended a game that textarena would have let go on: a failure.
            return "Out of turns.", 0.0, True, {"success": False, "invalid": False, "turns": self._turn}
        rewards, game_info = self._env.close()
        reward = float(rewards.get(0, 0.0))
        info0 = game_info.get(0, {}) if isinstance(game_info, dict) else {}
        reason = str(info0.get("reason", "Game over."))
        return reason, reward, True, {
            "success": reward > 0, "invalid": bool(info0.get("invalid_move", False)), "turns": self._turn}


register("textarena", TextArenaEnv, "a textarena single-player game (env_id=GuessTheNumber-v0, TowerOfHanoi-v0, ...)")
