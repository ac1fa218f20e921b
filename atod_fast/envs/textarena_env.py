"""Adapter for textarena's single-player games (``pip install "atod-fast[textarena]"``).

textarena returns the whole game log as each observation; the adapter passes on only
what is new since the last one, without the echo of the agent's own move, so that each
turn of the conversation carries just the game's reply. The reward is textarena's
player-0 reward, given when the game ends; ``success`` means a win (reward 1: a lost game
may still earn partial credit).

``max_turns`` is handed to the game itself when it takes one (GuessTheNumber does), so that
a game that runs out of turns ends by the game's own rule with the game's own reward. Cutting
such a game short here instead would pay 0 where textarena pays partial credit, and a policy
learning from the reward finds that ending the game with invalid moves (which textarena also
pays partial credit for) beats playing on. textarena checks its turn limit before counting the
current turn, so a game made with ``max_turns=k`` allows k + 1 moves: the adapter passes
``max_turns - 1`` (the game's prompt then names one turn fewer than the agent gets). Games
without a turn parameter are cut here after ``max_turns`` turns, as a loss with reward 0.

textarena seeds Python's global ``random`` in ``reset``; the adapter restores the global
state afterwards so that it cannot disturb the trainer's own random streams.

``GuessTheNumber`` games have a scripted expert (``expert_error_rate`` set, 0 for a perfect
one): it reads the range from the first observation and bisects the interval left open by the
"higher"/"lower" hints, answering like ``[7]``. With probability ``expert_error_rate`` it
guesses a uniformly random number of that interval instead (consistent with every hint, so
never an invalid move, but slower), which leaves a teacher made from it room to be beaten
under a tight turn limit.
"""

from __future__ import annotations

import random
import re
from typing import Any

from .base import register


def _new_text(previous: str, current: str) -> str:
    text = current[len(previous):] if current.startswith(previous) else current
    lines = [ln for ln in text.splitlines() if not ln.startswith("[Player]")]
    return "\n".join(lines).strip()


_RANGE = re.compile(r"between (-?\d+) and (-?\d+)")
_EXPERT_GAMES = ("GuessTheNumber",)


def _takes_max_turns(textarena, env_id: str) -> bool:
    """Whether the registered game has a ``max_turns`` argument (textarena's registry keeps each id's kwargs)."""
    from textarena.envs.registration import ENV_REGISTRY

    spec = ENV_REGISTRY.get(env_id)
    if spec is None:
        raise ValueError(f"env_id: {env_id!r} is not a registered textarena environment")
    return "max_turns" in spec.kwargs


class TextArenaEnv:
    """A textarena single-player game as an atod-fast environment."""

    def __init__(self, *, env_id: str = "GuessTheNumber-v0", max_turns: int = 20,
                 expert_error_rate: float | None = None):
        try:
            import textarena
        except ImportError as e:
            raise ImportError(
                "the textarena environments need the textarena package: pip install 'atod-fast[textarena]'"
            ) from e
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        if expert_error_rate is not None:
            if not env_id.startswith(_EXPERT_GAMES):
                raise ValueError(f"no scripted expert for env_id={env_id!r} (only for {', '.join(_EXPERT_GAMES)})")
            if not isinstance(expert_error_rate, (int, float)) or not 0.0 <= expert_error_rate <= 1.0:
                raise ValueError(f"expert_error_rate must be in [0, 1], got {expert_error_rate!r}")
        self._ta = textarena
        self.env_id, self.max_turns = env_id, max_turns
        self._make_kwargs = {"max_turns": max_turns - 1} if _takes_max_turns(textarena, env_id) else {}
        self.expert_error_rate = expert_error_rate
        self._env = None
        self._done = True

    def reset(self, seed: int) -> str:
        state = random.getstate()
        try:
            self._env = self._ta.make(self.env_id, **self._make_kwargs)
            self._env.reset(num_players=1, seed=seed)
        finally:
            random.setstate(state)
        _, obs = self._env.get_observation()
        self._seen = obs
        self._turn = 0
        self._done = False
        if self.expert_error_rate is not None:
            m = _RANGE.search(obs)
            if m is None:
                raise RuntimeError(f"{self.env_id}: no 'between LOW and HIGH' in the first observation: {obs!r}")
            self._lo, self._hi = int(m.group(1)), int(m.group(2))
            self._expert_rng = random.Random(seed ^ 0x5EED)  # its own stream: never the global one
            self._last_guess = None
        return obs.strip()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._turn += 1
        if self.expert_error_rate is not None:
            m = re.search(r"\[(-?\d+)\]", action)
            self._last_guess = int(m.group(1)) if m else None
        done, _ = self._env.step(action)
        if not done and self._turn < self.max_turns:
            _, obs = self._env.get_observation()
            new = _new_text(self._seen, obs)
            self._seen = obs
            if self.expert_error_rate is not None and self._last_guess is not None:
                if "higher" in new.lower():
                    self._lo = max(self._lo, self._last_guess + 1)
                elif "lower" in new.lower():
                    self._hi = min(self._hi, self._last_guess - 1)
            return new, 0.0, False, {"invalid": "invalid" in new.lower()}
        self._done = True
        if not done:
            # A game without a turn argument, cut here: a loss (the game has no reward to give for it).
            return "Out of turns.", 0.0, True, {"success": False, "invalid": False, "turns": self._turn}
        rewards, game_info = self._env.close()
        reward = float(rewards.get(0, 0.0))
        info0 = game_info.get(0, {}) if isinstance(game_info, dict) else {}
        reason = str(info0.get("reason", "Game over."))
        # textarena's single-player games give 1 for a win and partial credit for a loss (GuessTheNumber:
        # closeness of the last guess), so a positive reward is not a win.
        return reason, reward, True, {
            "success": reward >= 1.0, "invalid": bool(info0.get("invalid_move", False)), "turns": self._turn}


    def expert_action(self) -> str:
        """The GuessTheNumber expert's next guess (see the module docstring)."""
        if self.expert_error_rate is None:
            raise RuntimeError("expert_action() needs the environment made with expert_error_rate (0 for none)")
        if self._done:
            raise RuntimeError("expert_action() called on a finished episode")
        if self.expert_error_rate > 0 and self._expert_rng.random() < self.expert_error_rate:
            return f"[{self._expert_rng.randint(self._lo, self._hi)}]"
        return f"[{(self._lo + self._hi) // 2}]"


register("textarena", TextArenaEnv, "a textarena single-player game (env_id=GuessTheNumber-v0, TowerOfHanoi-v0, ...)",
         package="textarena")
