"""Built-in environments: determinism, experts, malformed input, and the textarena adapter."""

import itertools
import random
import re
import subprocess
from collections import deque

import pytest

from atod_fast.envs import ExpertEnv, GuessNumberEnv, HanoiEnv, make, registered
from atod_fast.envs.hanoi import optimal_move


def play_expert(env, seed):
    env.reset(seed)
    total, turns = 0.0, 0
    while True:
        _, r, done, info = env.step(env.expert_action())
        total += r
        turns += 1
        if done:
            return info["success"], total, turns


@pytest.mark.parametrize("name, kwargs", [
    ("guess_number", {}),
    ("guess_number", dict(low=1, high=100, max_turns=7)),
    ("hanoi", {}),
    ("hanoi", dict(n_disks=4)),
])
def test_every_builtin_expert_always_succeeds(name, kwargs):
    env = make(name, **kwargs)
    assert isinstance(env, ExpertEnv)
    results = [play_expert(env, seed) for seed in range(200)]
    assert all(ok for ok, _, _ in results)
    assert all(total == 1.0 for _, total, _ in results)


@pytest.mark.parametrize("name", ["guess_number", "hanoi"])
def test_erring_expert_leaves_headroom(name):
    env = make(name, expert_error_rate=0.5, **({"max_turns": 4} if name == "guess_number" else {}))
    rate = sum(play_expert(env, seed)[0] for seed in range(300)) / 300
    assert 0.2 < rate < 0.95


@pytest.mark.parametrize("name", ["guess_number", "hanoi"])
def test_deterministic_per_seed(name):
    a, b = make(name, expert_error_rate=0.3), make(name, expert_error_rate=0.3)
    for seed in (0, 1, 12345):
        assert a.reset(seed) == b.reset(seed)
        trace_a = [a.step(a.expert_action()) for _ in range(2)]
        trace_b = [b.step(b.expert_action()) for _ in range(2)]
        assert trace_a == trace_b
    starts = {make(name).reset(s) + str(play_expert(make(name), s)[2]) for s in range(30)}
    assert len(starts) > 1, "seeds must change the episode"


def test_guess_number_feedback_and_malformed_actions():
    env = GuessNumberEnv(low=1, high=16, max_turns=4)
    env.reset(7)
    secret = env._secret
    obs, r, done, info = env.step("hmm, no idea")
    assert not done and r == 0.0 and info["invalid"] and "one number between 1 and 16" in obs
    obs, r, done, info = env.step("99")
    assert info["invalid"] and "out of range" in obs
    low_guess = 1 if secret != 1 else 2
    obs, _, _, info = env.step(f"My guess is {low_guess}.")
    assert not info["invalid"] and obs == ("Higher." if low_guess < secret else "Lower.")
    obs, r, done, info = env.step(str(secret))
    assert done and r == 1.0 and info["success"]
    with pytest.raises(RuntimeError):
        env.step("3")


def test_guess_number_turn_limit():
    env = GuessNumberEnv(low=1, high=16, max_turns=2)
    env.reset(0)
    wrong = 1 if env._secret != 1 else 2
    env.step(str(wrong))
    obs, r, done, info = env.step(str(wrong))
    assert done and r == 0.0 and not info["success"] and "Out of guesses" in obs


def _bfs_distance_to_goal(n):
    goal = (2,) * n
    dist = {goal: 0}
    q = deque([goal])
    while q:
        s = q.popleft()
        for src, dst in itertools.permutations(range(3), 2):
            on_src = [d for d in range(n) if s[d] == src]
            on_dst = [d for d in range(n) if s[d] == dst]
            if on_src and (not on_dst or min(on_dst) > min(on_src)):
                t = list(s)
                t[min(on_src)] = dst
                t = tuple(t)
                if t not in dist:
                    dist[t] = dist[s] + 1
                    q.append(t)
    return dist


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_hanoi_expert_is_optimal_from_every_position(n):
    dist = _bfs_distance_to_goal(n)
    assert len(dist) == 3**n
    for state, d in dist.items():
        pos = [0, *state]
        moves = 0
        while any(p != 2 for p in pos[1:]):
            src, dst = optimal_move(pos, n, 2)
            top = min(k for k in range(1, n + 1) if pos[k] == src)
            assert all(pos[k] != dst for k in range(1, top)), "illegal expert move"
            pos[top] = dst
            moves += 1
        assert moves == d


def test_hanoi_malformed_and_illegal_moves():
    env = HanoiEnv(n_disks=3)
    env.reset(3)
    env._pos = [0, 0, 0, 0]  # all disks on A
    obs, _, done, info = env.step("go left")
    assert info["invalid"] and "expected two pegs" in obs and not done
    obs, _, _, info = env.step("B C")
    assert info["invalid"] and "peg B is empty" in obs
    env.step("A C")
    obs, _, _, info = env.step("A C")
    assert info["invalid"] and "cannot go on smaller disk 1" in obs
    obs, _, _, info = env.step("move a to b")
    assert not info["invalid"] and obs == "A:3 B:2 C:1"


def test_registry():
    assert {"guess_number", "hanoi", "textarena"} <= set(registered())
    with pytest.raises(ValueError, match=r"unknown environment 'nope'.*guess_number"):
        make("nope")
    with pytest.raises(ValueError, match="max_turns"):
        make("guess_number", max_turns=0)
    out = subprocess.run(["atod-fast", "envs"], capture_output=True, text=True, check=True).stdout
    assert "guess_number" in out and "hanoi" in out


def test_textarena_guess_the_number_adapter():
    pytest.importorskip("textarena")
    env = make("textarena", env_id="GuessTheNumber-v0")
    state = random.getstate()
    obs = env.reset(seed=3)
    assert random.getstate() == state, "the adapter must not disturb the global random state"
    assert "Guess The Number" in obs and "[5]" in obs
    lo, hi = 1, 20
    for _ in range(10):
        guess = (lo + hi) // 2
        obs, reward, done, info = env.step(f"[{guess}]")
        if done:
            break
        assert "[Player]" not in obs and ("higher" in obs or "lower" in obs)
        lo, hi = (guess + 1, hi) if "higher" in obs else (lo, guess - 1)
    assert done and info["success"] and reward == 1.0

    env.reset(seed=4)
    obs, reward, done, info = env.step("no brackets here")
    while not done:
        obs, reward, done, info = env.step("still nothing")
    assert not info["success"] and info["invalid"]


def _play_expert(env, seed):
    obs, done = env.reset(seed), False
    while not done:
        action = env.expert_action()
        assert re.fullmatch(r"\[\d+\]", action), action
        obs, reward, done, info = env.step(action)
        assert not info["invalid"], obs
    return info, reward


def test_textarena_guess_the_number_expert():
    pytest.importorskip("textarena")
    # Perfect bisection finds any number of 1..20 in at most 5 guesses, whatever the secret.
    env = make("textarena", env_id="GuessTheNumber-v0", max_turns=5, expert_error_rate=0.0)
    state = random.getstate()
    results = [_play_expert(env, s) for s in range(40)]
    assert random.getstate() == state, "the expert must not draw from the global random state"
    assert all(info["success"] and reward == 1.0 and info["turns"] <= 5 for info, reward in results)

    # With errors: still only hint-consistent, valid guesses (checked in _play_expert), deterministic per seed,
    # and with 4 guesses (fewer than bisection needs for 1..20) it fails more often than bisection does.
    def rate(error_rate):
        e = make("textarena", env_id="GuessTheNumber-v0", max_turns=4, expert_error_rate=error_rate)
        return sum(_play_expert(e, s)[0]["success"] for s in range(120)) / 120

    perfect, sloppy = rate(0.0), rate(0.5)
    assert 0.6 <= perfect <= 0.9 and sloppy < perfect - 0.05, (perfect, sloppy)
    assert rate(0.5) == sloppy


def test_textarena_expert_only_where_it_exists():
    pytest.importorskip("textarena")
    with pytest.raises(ValueError, match="no scripted expert for env_id='TowerOfHanoi-v0'"):
        make("textarena", env_id="TowerOfHanoi-v0", expert_error_rate=0.0)
    with pytest.raises(ValueError, match="expert_error_rate"):
        make("textarena", env_id="GuessTheNumber-v0", expert_error_rate=1.5)
    env = make("textarena", env_id="GuessTheNumber-v0")
    env.reset(0)
    with pytest.raises(RuntimeError, match="expert_error_rate"):
        env.expert_action()


def test_textarena_partial_credit_is_not_a_win():
    pytest.importorskip("textarena")
    env = make("textarena", env_id="GuessTheNumber-v0", max_turns=6)
    losses = 0
    for seed in range(6):
        env.reset(seed)
        done, guesses = False, iter(range(1, 21))
        while not done:  # 1, 2, 3, ...: the game's own turn limit ends it when the secret is above 6
            _, reward, done, info = env.step(f"[{next(guesses)}]")
        if reward < 1.0:
            losses += 1
            # Running out of turns pays the game's own partial credit (closeness of the last guess), exactly
            # what ending the game early with invalid moves pays: never 0, so quitting is no better than playing.
            assert 0.0 < reward < 1.0 and not info["success"] and info["turns"] == 6, (reward, info)
        else:
            assert info["success"] and reward == 1.0
    assert losses >= 1
