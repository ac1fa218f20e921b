"""ScienceWorld tasks (``pip install "atod-fast[envs]"``, Java >= 11): 30 elementary-science tasks with
train/dev/test variations and a gold-path solver.

``task`` is ScienceWorld's task name (or its number, e.g. ``1-1``); ``simplifications`` its own
string (``easy`` or e.g. ``teleportAction,openDoors``). The variation comes from the seed like
TextWorldExpress's fold (``split_of``): training episodes and demonstrations play the train
variations, held-out evaluation the test variations, selection the dev ones; the seed's index
``i`` in its range plays variation ``i mod n`` of that split's ``n``.

ScienceWorld parses free text itself, so an action is invalid when ScienceWorld answers that no
known action matches it; it uses up the turn. The reward, given when the episode ends, is
ScienceWorld's score clipped to [0, 1]; ``success`` means the task completed with full score. An
episode ends when ScienceWorld says it is completed (success or failure) or after ``max_turns``.
The expert follows the gold action sequence, spending turns on ``look around``/``inventory`` with
probability ``expert_error_rate`` (set it, 0 for none, to have an expert).
"""

from __future__ import annotations

from typing import Any

from ._jvm import GameHandle
from .base import register, split_of
from .gold_path import HARMLESS, GoldPathExpert, check_rate, check_turns, need_java, normalize

_NO_MATCH = "No known action matches that input."
_SPLITS: dict[tuple[str, str], list[int]] = {}


def _sw_paths() -> tuple[str, str]:
    try:
        from scienceworld.constants import BASEPATH, JAR_PATH
    except ImportError as e:
        raise ImportError("env scienceworld needs the scienceworld package: pip install 'atod-fast[envs]'") from e
    need_java("env scienceworld")
    return JAR_PATH, BASEPATH


class ScienceWorldEnv:
    """A ScienceWorld task as an atod-fast environment; see the module docstring."""

    def __init__(self, *, task: str = "find-living-thing", simplifications: str = "easy", max_turns: int = 50,
                 expert_error_rate: float | None = None):
        jar, cwd = _sw_paths()
        from scienceworld.utils import infer_task

        try:
            self.task = infer_task(task)
        except Exception as e:
            raise ValueError(f"task {task!r} is not a ScienceWorld task ({e})") from None
        self.simplifications = simplifications
        self.max_turns = check_turns(max_turns)
        self.expert_error_rate = None if expert_error_rate is None else check_rate(expert_error_rate)
        self._game = GameHandle(self, jar, cwd, ("sw", self.task), self._new_server)
        self._done = True

    def _new_server(self, jvm):
        server = jvm.scienceworld.runtime.pythonapi.PythonInterface()
        names = list(server.getTaskNames())
        if self.task not in names:
            raise ValueError(f"task must be one of {', '.join(names)}, got {self.task!r}")
        return server

    def variations(self, split: str) -> list[int]:
        """ScienceWorld's variations of ``split`` (train, dev or test) for this task."""
        key = (self.task, split)
        if key not in _SPLITS:
            self._game.call("load", self.task, 0, "", False)
            method = {"train": "getVariationsTrain", "dev": "getVariationsDev", "test": "getVariationsTest"}[split]
            _SPLITS[key] = [int(v) for v in self._game.call(method)]
        return _SPLITS[key]

    def variation_of(self, seed: int) -> tuple[str, int]:
        """(split, variation) that ``reset(seed)`` plays."""
        split, index = split_of(seed)
        found = self.variations(split)
        return split, found[index % len(found)]

    def reset(self, seed: int) -> str:
        _, variation = self.variation_of(seed)
        expert = self.expert_error_rate is not None
        self._game.call("load", self.task, variation, self.simplifications, expert)
        if expert:
            self.expert = GoldPathExpert(list(self._game.call("getGoldActionSequence")), self.expert_error_rate, seed)
        self._turn, self._done = 0, False
        task = self._game.call("freeActionTaskDesc").strip()
        return f"{task}\n\n{self._game.call('freeActionLook').strip()}"

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._turn += 1
        act = normalize(action)
        obs = str(self._game.call("step", act)).strip()
        invalid = obs == _NO_MATCH
        if invalid:
            obs = f"'{act}' is not an action ScienceWorld knows; reply with one action, e.g. 'look around'."
        elif self.expert_error_rate is not None:
            self.expert.observe(act)
        score = float(self._game.call("getScore"))
        completed = bool(self._game.call("getCompleted")) or score < 0
        if not completed and self._turn < self.max_turns:
            return obs, 0.0, False, {"invalid": invalid}
        self._done = True
        return obs, min(max(score, 0.0), 1.0), True, {
            "success": completed and score >= 1.0, "invalid": invalid, "turns": self._turn, "score": score}

    def expert_action(self) -> str:
        """The gold path's next action, or with probability ``expert_error_rate`` a harmless one."""
        if self.expert_error_rate is None:
            raise RuntimeError("expert_action() needs the environment made with expert_error_rate (0 for none)")
        if self._done:
            raise RuntimeError("expert_action() called on a finished episode")
        return self.expert.action(list(HARMLESS))

    def close(self) -> None:
        self._game.close()


register("scienceworld", ScienceWorldEnv,
         "a ScienceWorld task (task=find-living-thing|boil|..., simplifications=easy); needs Java",
         package="scienceworld")
