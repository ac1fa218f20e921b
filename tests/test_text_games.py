"""The TextWorldExpress and ScienceWorld adapters (``pip install ".[envs]"``, Java >= 11)."""

import gc
import shutil

import pytest

from atod_fast.envs import make, split_of
from atod_fast.trainer.seeds import demo_seeds, dev_seeds, eval_seeds, train_seeds

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TextWorldExpress and ScienceWorld need Java")
twx = pytest.importorskip("textworld_express", reason="needs textworld-express: pip install '.[envs]'")

COIN = dict(game="coin", game_params="numLocations=3,includeDoors=0")


def play_expert(env, seed):
    env.reset(seed)
    turns = 0
    while True:
        _, reward, done, info = env.step(env.expert_action())
        turns += 1
        if done:
            return reward, info, turns


def test_seed_ranges_map_to_splits():
    assert {split_of(s)[0] for s in train_seeds(3, 7, 64) + demo_seeds(0, 16)} == {"train"}
    assert [split_of(s) for s in eval_seeds(3)] == [("test", 0), ("test", 1), ("test", 2)]
    assert [split_of(s) for s in dev_seeds(2)] == [("dev", 0), ("dev", 1)]


def test_training_and_heldout_games_never_overlap():
    env = make("textworld_express", **COIN)
    train_games = {env.game_of(s) for step in range(50) for s in train_seeds(0, step, 32)}
    train_games |= {env.game_of(s) for s in demo_seeds(0, 500)}
    test_games = {env.game_of(s) for s in eval_seeds(1000)}
    dev_games = {env.game_of(s) for s in dev_seeds(1000)}
    assert {f for f, _ in train_games} == {"train"} and {f for f, _ in test_games} == {"test"}
    assert {s for _, s in train_games} <= set(env.fold_seeds("train"))
    assert {s for _, s in test_games} == set(env.fold_seeds("test"))  # 1000 held-out seeds: every test game
    assert {s for _, s in dev_games} == set(env.fold_seeds("dev"))
    seeds = [{s for _, s in g} for g in (train_games, test_games, dev_games)]
    assert not (seeds[0] & seeds[1]) and not (seeds[0] & seeds[2]) and not (seeds[1] & seeds[2])


def test_episodes_are_deterministic_in_the_seed():
    a, b = make("textworld_express", **COIN), make("textworld_express", **COIN)
    for seed in (0, 5, eval_seeds(3)[2]):
        assert a.reset(seed) == b.reset(seed)
        assert a.step("look around") == b.step("look around")
    assert len({a.reset(s) for s in range(20)}) > 1, "seeds must change the game"


@pytest.mark.parametrize("kwargs", [COIN, dict(game="cookingworld"), dict(game="twc")])
def test_gold_path_expert_wins_with_full_reward(kwargs):
    env = make("textworld_express", expert_error_rate=0.0, max_turns=60, **kwargs)
    for seed in (0, 1, eval_seeds(2)[1]):
        reward, info, _ = play_expert(env, seed)
        assert reward == 1.0 and info["success"] and not info["invalid"]


def test_erring_expert_keeps_the_gold_path_valid_but_takes_longer():
    sure = make("textworld_express", expert_error_rate=0.0, max_turns=60, **COIN)
    slow = make("textworld_express", expert_error_rate=0.5, max_turns=60, **COIN)
    results = [play_expert(slow, s) for s in range(30)]
    assert all(r == 1.0 and info["success"] and not info["invalid"] for r, info, _ in results)
    actions = []
    slow.reset(3)
    while True:
        actions.append(slow.expert_action())
        if slow.step(actions[-1])[2]:
            break
    assert {"look around", "inventory"} & set(actions[1:])
    # a tight turn limit makes the erring expert lose sometimes: a teacher made from it can be beaten
    tight = make("textworld_express", expert_error_rate=0.5, max_turns=4, **COIN)
    wins = [play_expert(tight, s)[1]["success"] for s in range(60)]
    assert 0 < sum(wins) < 60
    assert sum(play_expert(sure, s)[2] for s in range(30)) < sum(t for _, _, t in results)


def test_invalid_actions_reward_and_listing():
    env = make("textworld_express", list_actions=True, max_turns=3, **COIN)
    first = env.reset(0)
    assert first.startswith("Your task is to search the environment and find the coin.")
    assert "Valid actions: " in first and "look around" in first
    obs, reward, done, info = env.step("Fly to the moon.")
    assert not done and reward == 0.0 and info == {"invalid": True}
    assert obs.startswith("'fly to the moon' is not a valid action here; reply with one action")
    obs, reward, done, info = env.step("  Look   Around. ")  # normalized to a valid action
    assert not info["invalid"] and "Valid actions:" in obs
    obs, reward, done, info = env.step("inventory")
    assert done and reward == 0.0 and info["success"] is False and info["turns"] == 3  # out of turns
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step("look around")
    with pytest.raises(RuntimeError, match="expert_error_rate"):
        env.expert_action()


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="game must be one of"):
        make("textworld_express", game="chess")
    with pytest.raises(ValueError, match="max_turns"):
        make("textworld_express", max_turns=0)
    with pytest.raises(ValueError, match="expert_error_rate"):
        make("textworld_express", expert_error_rate=2)


def test_envs_share_one_jvm_and_a_hung_call_retires_it():
    from atod_fast.envs import _jvm

    a, b = make("textworld_express", **COIN), make("textworld_express", **COIN)
    jvm = a._game.jvm
    assert b._game.jvm is jvm and jvm.proc.poll() is None
    a.reset(1), b.reset(2)
    assert a.step("look around")[0] != "" and b.step("inventory")[0] != ""
    a._game.busy = True  # as if a call were stuck: close() must retire the JVM rather than reuse it
    a.close()
    assert jvm.retired and jvm.proc.poll() is None, "b still uses it"
    c = make("textworld_express", **COIN)
    assert c._game.jvm is not jvm and c.reset(1)
    del b
    gc.collect()
    assert jvm.proc.wait(timeout=30) is not None, "the retired JVM is killed when its last user lets go"
    assert _jvm._CURRENT[jvm.jar] is c._game.jvm


@pytest.mark.parametrize("task", ["find-living-thing", "find-plant"])
def test_scienceworld_protocol_and_gold_path_expert(task):
    pytest.importorskip("scienceworld", reason="needs scienceworld: pip install '.[envs]'")
    env = make("scienceworld", task=task, expert_error_rate=0.0)
    assert env.variation_of(0) == ("train", env.variations("train")[0])
    assert env.variation_of(eval_seeds(1)[0]) == ("test", env.variations("test")[0])
    assert not set(env.variations("train")) & set(env.variations("test"))
    for seed in (1, eval_seeds(1)[0]):
        reward, info, _ = play_expert(env, seed)
        assert reward == 1.0 and info["success"]
    first = env.reset(0)
    assert first.startswith("Task Description:") and "This room is called" in first
    obs, reward, done, info = env.step("fly away")
    assert info["invalid"] and not done and "not an action ScienceWorld knows" in obs


def test_train_two_steps_on_coin_then_evaluate_held_out(tmp_path, private_cache):
    # `atod-fast train env.name=textworld_express env.kwargs.game=coin max_steps=2`, with tiny models: the built-in
    # teacher made from the gold-path expert, the hand-over's bar, two steps, then `atod-fast eval` on the test fold.
    from atod_fast.cli import main
    from atod_fast.trainer.metrics import read_metrics

    run = tmp_path / "run"
    tiny = ["sft.steps=10", "sft.episodes=32", "sft.batch_size=8", "sft.arch.hidden_size=32",
            "sft.arch.intermediate_size=64", "sft.arch.num_heads=2", "model.student_arch.hidden_size=32",
            "model.student_arch.intermediate_size=64", "model.student_arch.num_heads=2", "env.kwargs.max_turns=3",
            "rollout.episodes_per_step=4", "eval.episodes=4", "logging.progress=false", "logging.tensorboard=false"]
    assert main(["train", "--output-dir", str(run), "env.name=textworld_express", "env.kwargs.game=coin",
                 "max_steps=2", *tiny]) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["turns_mean"] > 0 and r["env_errors"] == 0 for r in rows)
    import json

    table = json.loads((run / "eval.json").read_text())  # the end-of-run held-out table
    assert "student-after" in json.dumps(table)
    assert main(["eval", "--checkpoint", str(run), "--no-compare", "--episodes", "4", "--json"]) == 0
