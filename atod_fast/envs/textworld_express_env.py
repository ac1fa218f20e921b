"""TextWorldExpress games (``pip install "atod-fast[envs]"``, Java >= 11): CookingWorld, TextWorld
Commonsense, Coin Collector and small games, at thousands of steps per second.

``game`` is TWX's game name and ``game_params`` TWX's own parameter string (e.g.
``numLocations=3,includeDoors=0``; ``""`` for TWX's defaults). Left unset, coin, cookingworld and twc
get a small world sized for a tiny CPU student (``SMALL``); TWX's defaults make episodes of
thousands of tokens. The fold comes from the seed (``split_of``): training episodes and
the expert's demonstrations play the train fold, held-out evaluation the test fold, selection the
dev fold. Within a fold, the seed's index ``i`` in its range (``split_of``) plays the game ``i mod n`` of
TWX's list of ``n`` valid seeds for that fold, so an episode is deterministic in the seed and the
folds never share a game.

An action is valid when, after normalizing (lower case, single spaces, no final period), it is one
of the game's ``validActions``; anything else uses up the turn and is answered with an explanation,
without reaching the game. ``list_actions`` appends the valid actions to every observation. The
reward, given when the episode ends, is TWX's score clipped to [0, 1] (TWX normalizes it: 1 on
completion); ``success`` is TWX's ``tasksuccess``. An episode ends on success, on TWX's
``taskfailure`` or after ``max_turns`` turns.

The expert (made with ``expert_error_rate`` set, 0 for a perfect one; TWX then also generates the
gold path at every reset) follows TWX's gold action sequence. With ``expert_error_rate`` > 0 it spends a turn on
``look around`` or ``inventory`` instead, which keeps the gold path valid but longer, so a turn
limit makes a teacher trained on it beatable. TWX makes Coin Collector's gold path by a search that
is not seeded: two resets of the same game may give gold paths of different lengths (the game
itself is the same).
"""

from __future__ import annotations

import json
from typing import Any

from ._jvm import GameHandle
from .base import register, split_of
from .gold_path import HARMLESS, GoldPathExpert, check_rate, check_turns, need_java, normalize

GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
SMALL = {
    "coin": "numLocations=3,numDistractorItems=0,includeDoors=0",
    "cookingworld": "numLocations=1,numIngredients=1,numDistractorItems=0,includeDoors=0",
    "twc": "numLocations=1,numItemsToPutAway=1,includeDoors=0",
}
"""game_params of a game when none is given (other games: TWX's defaults)."""
_FOLD_SEEDS: dict[tuple[str, str, str], list[int]] = {}


def _twx_paths() -> tuple[str, str]:
    try:
        from textworld_express.constants import BASEPATH, JAR_PATH
    except ImportError as e:
        raise ImportError("env textworld_express needs the textworld-express package: "
                          "pip install 'atod-fast[envs]'") from e
    need_java("env textworld_express")
    return JAR_PATH, BASEPATH


class TextWorldExpressEnv:
    """A TextWorldExpress game as an atod-fast environment; see the module docstring."""

    def __init__(self, *, game: str = "coin", game_params: str | None = None, list_actions: bool = False,
                 max_turns: int = 20, expert_error_rate: float | None = None):
        if game not in GAMES:
            raise ValueError(f"game must be one of {', '.join(GAMES)}, got {game!r}")
        if game_params is None:
            game_params = SMALL.get(game, "")
        if not isinstance(game_params, str):
            raise ValueError(f"game_params must be TWX's parameter string (e.g. 'numLocations=3'), got {game_params!r}")
        self.game, self.game_params, self.list_actions = game, game_params, bool(list_actions)
        self.max_turns = check_turns(max_turns)
        self.expert_error_rate = None if expert_error_rate is None else check_rate(expert_error_rate)
        jar, cwd = _twx_paths()
        self._game = GameHandle(self, jar, cwd, ("twx", game, game_params), self._new_server)
        self._done = True

    def _new_server(self, jvm):
        server = jvm.textworldexpress.runtime.PythonInterface()
        msg = server.load(self.game, self.game_params)
        if msg:
            raise ValueError(f"game_params {self.game_params!r} rejected by TextWorldExpress: {msg}")
        return server

    def fold_seeds(self, fold: str) -> list[int]:
        """TWX's valid game seeds of ``fold`` (train, dev or test) for this game and its parameters."""
        key = (self.game, self.game_params, fold)
        if key not in _FOLD_SEEDS:
            method = {"train": "getSeedsTrain", "dev": "getSeedsDev", "test": "getSeedsTest"}[fold]
            _FOLD_SEEDS[key] = [int(s) for s in self._game.call(method)]
        return _FOLD_SEEDS[key]

    def game_of(self, seed: int) -> tuple[str, int]:
        """(fold, TWX seed) that ``reset(seed)`` plays."""
        fold, index = split_of(seed)
        seeds = self.fold_seeds(fold)
        return fold, seeds[index % len(seeds)]

    def reset(self, seed: int) -> str:
        fold, twx_seed = self.game_of(seed)
        expert = self.expert_error_rate is not None
        info = json.loads(self._game.call("generateNewGameJSON", twx_seed, fold, expert))
        if expert:
            self.expert = GoldPathExpert(list(self._game.call("getGoldActionSequence")), self.expert_error_rate, seed)
        self._valid = list(info["validActions"])
        self._turn, self._score, self._done = 0, 0.0, False
        task = self._game.call("getTaskDescription").strip()
        return self._with_actions(f"{task}\n\n{info['observation'].strip()}")

    def _with_actions(self, obs: str) -> str:
        return f"{obs}\nValid actions: {', '.join(sorted(self._valid))}." if self.list_actions else obs

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._turn += 1
        act = normalize(action)
        if act not in self._valid:
            shown = act if act else "(nothing)"
            obs = self._with_actions(f"'{shown}' is not a valid action here; reply with one action, e.g. "
                                     f"'{sorted(self._valid)[0]}'.")
            return self._finish(obs, invalid=True, success=False, failed=False)
        info = json.loads(self._game.call("stepJSON", act))
        if self.expert_error_rate is not None:
            self.expert.observe(act)
        self._valid = list(info["validActions"])
        self._score = float(info["score"])
        return self._finish(self._with_actions(info["observation"].strip()), invalid=False,
                            success=bool(info["tasksuccess"]), failed=bool(info["taskfailure"]))

    def _finish(self, obs: str, *, invalid: bool, success: bool, failed: bool):
        if not (success or failed or self._turn >= self.max_turns):
            return obs, 0.0, False, {"invalid": invalid}
        self._done = True
        reward = min(max(self._score, 0.0), 1.0)
        return obs, reward, True, {"success": success, "invalid": invalid, "turns": self._turn, "score": self._score}

    def expert_action(self) -> str:
        """The gold path's next action, or with probability ``expert_error_rate`` a harmless one."""
        if self.expert_error_rate is None:
            raise RuntimeError("expert_action() needs the environment made with expert_error_rate (0 for none)")
        if self._done:
            raise RuntimeError("expert_action() called on a finished episode")
        return self.expert.action([a for a in HARMLESS if a in self._valid])

    def close(self) -> None:
        self._game.close()


register("textworld_express", TextWorldExpressEnv,
         "a TextWorldExpress game (game=coin|cookingworld|twc|..., game_params='numLocations=3'); needs Java",
         package="textworld_express")
