"""Tower of Hanoi from a random start: move every disk to peg C, one move per turn.

Each episode starts from a random legal position (every disk on a random peg, larger disks
below), seeded. An action names the source and the target peg, e.g. ``A C``; an illegal or
unparsable move uses up the turn and the observation says why. Reward 1.0 when all disks
are on C within ``max_turns`` moves (sparse, at the end), else 0.

The scripted expert plays the first move of an optimal plan from the current position
(at most 2^n − 1 moves from any position). With ``expert_error_rate`` > 0 it plays a
random legal move instead with that probability.
"""

from __future__ import annotations

import random
import re
from typing import Any

from .base import register

PEGS = "ABC"
_MOVE = re.compile(r"\b([ABCabc])\b\W*(?:to\W*)?\b([ABCabc])\b")


def optimal_move(pos: list[int], k: int, target: int) -> tuple[int, int] | None:
    """First move of the shortest plan putting disks 1..k (``pos[d]`` = peg of disk d) on ``target``."""
    while k > 0 and pos[k] == target:
        k -= 1
    if k == 0:
        return None
    # Disk k must move to target: first clear disks 1..k-1 onto the third peg.
    other = 3 - pos[k] - target
    return optimal_move(pos, k - 1, other) or (pos[k], target)


class HanoiEnv:
    """Tower of Hanoi from a random position; see the module docstring."""

    def __init__(self, *, n_disks: int = 3, max_turns: int | None = None, expert_error_rate: float = 0.0):
        if not isinstance(n_disks, int) or not 1 <= n_disks <= 10:
            raise ValueError(f"n_disks must be an integer in [1, 10], got {n_disks!r}")
        if max_turns is None:
            max_turns = 2**n_disks + 1
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        if not 0.0 <= expert_error_rate <= 1.0:
            raise ValueError(f"expert_error_rate must be in [0, 1], got {expert_error_rate!r}")
        self.n_disks, self.max_turns, self.expert_error_rate = n_disks, max_turns, expert_error_rate
        self._done = True

    # pos[d] is the peg (0, 1, 2) of disk d; disk 1 is the smallest, pos[0] is unused.
    def _top(self, peg: int) -> int | None:
        disks = [d for d in range(1, self.n_disks + 1) if self._pos[d] == peg]
        return min(disks) if disks else None

    def _state(self) -> str:
        cols = []
        for p, name in enumerate(PEGS):
            disks = sorted((d for d in range(1, self.n_disks + 1) if self._pos[d] == p), reverse=True)
            cols.append(f"{name}:{' '.join(map(str, disks)) or '-'}")
        return " ".join(cols)

    def _solved(self) -> bool:
        return all(self._pos[d] == 2 for d in range(1, self.n_disks + 1))

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        while True:
            self._pos = [0] + [rng.randrange(3) for _ in range(self.n_disks)]
            if not self._solved():
                break
        self._expert_rng = random.Random(rng.getrandbits(64))
        self._turn = 0
        self._done = False
        return (f"Move all disks to C, one move per turn, never a larger disk on a smaller one. "
                f"Reply like 'A C'. Pegs list disks bottom to top. {self._state()}")

    def _legal(self, src: int, dst: int) -> str | None:
        """None if the move is legal, else the reason."""
        if src == dst:
            return "source and target are the same peg"
        top = self._top(src)
        if top is None:
            return f"peg {PEGS[src]} is empty"
        under = self._top(dst)
        if under is not None and under < top:
            return f"disk {top} cannot go on smaller disk {under}"
        return None

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self._turn += 1
        m = _MOVE.search(action)
        if m is None:
            obs, invalid = f"Invalid move (expected two pegs like 'A C'). {self._state()}", True
        else:
            src, dst = PEGS.index(m.group(1).upper()), PEGS.index(m.group(2).upper())
            why = self._legal(src, dst)
            if why is None:
                self._pos[self._top(src)] = dst
                obs, invalid = self._state(), False
            else:
                obs, invalid = f"Illegal move ({why}). {self._state()}", True
        if self._solved():
            self._done = True
            return f"Solved. {self._state()}", 1.0, True, {"success": True, "invalid": invalid, "turns": self._turn}
        if self._turn >= self.max_turns:
            self._done = True
            return f"{obs} Out of moves.", 0.0, True, {"success": False, "invalid": invalid, "turns": self._turn}
        return obs, 0.0, False, {"invalid": invalid}

    def expert_action(self) -> str:
        if self._done:
            raise RuntimeError("expert_action() called on a finished episode")
        if self.expert_error_rate > 0 and self._expert_rng.random() < self.expert_error_rate:
            legal = [(s, d) for s in range(3) for d in range(3) if self._legal(s, d) is None]
            src, dst = self._expert_rng.choice(legal)
        else:
            move = optimal_move(self._pos, self.n_disks, 2)
            assert move is not None, "expert asked to move in a solved position"
            src, dst = move
        return f"{PEGS[src]} {PEGS[dst]}"


register("hanoi", HanoiEnv, "Tower of Hanoi from a random start, one move per turn, sparse reward")
