"""Critic-free advantages (ppo.advantage=grpo): group seeds, group-normalized returns, no value head trained."""

from __future__ import annotations

import pytest
import torch

from atod_fast.trainer.config import ConfigError, load_train_config
from atod_fast.trainer.grpo import GrpoEstimator, episode_returns, group_env_seeds, sample_keys
from atod_fast.trainer.seeds import train_seeds


def test_group_seeds():
    assert group_env_seeds(3, 7, 12, 1) == train_seeds(3, 7, 12)  # no groups: the seeds of today
    s = group_env_seeds(3, 7, 12, 4)
    assert s[:4] == [s[0]] * 4 and s[4:8] == [s[4]] * 4 and s[8:] == [s[8]] * 4
    assert len({s[0], s[4], s[8]}) == 3
    with pytest.raises(ValueError, match="multiple"):
        group_env_seeds(3, 7, 12, 5)
    keys = sample_keys(s, range(12), 4)
    assert len(set(keys)) == 12  # each episode of a group samples apart
    assert sample_keys(s, range(12), 1) == s


def _manual(returns, g):
    out = []
    for k in range(0, len(returns), g):
        r = torch.tensor(returns[k:k + g], dtype=torch.float64)
        std = r.std(unbiased=True)
        out += ((r - r.mean()) / (std + 1e-6) if std > 0 else torch.zeros(g)).tolist()
    return torch.tensor(out, dtype=torch.float32)


def test_group_normalized_returns_on_every_agent_token():
    returns = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.2, 0.3, 0.3, 0.3]
    est = GrpoEstimator(3)
    assert not est.needs_values
    adv = est.episode_advantages(torch.tensor(returns), range(12), 12)
    torch.testing.assert_close(adv, _manual(returns, 3), rtol=1e-6, atol=1e-7)
    assert adv[3:6].abs().max() == 0 and adv[9:].abs().max() == 0  # constant groups: 0, never NaN
    counts = [2, 0, 3] + [1] * 9
    tok = est.token_advantages(torch.tensor(returns), range(12), 12, counts)
    assert tok.shape == (sum(counts),) and tok.dtype == torch.float32
    torch.testing.assert_close(tok[:5], torch.stack([adv[0], adv[0], adv[2], adv[2], adv[2]]))


def test_groups_spread_over_ranks_get_the_one_process_advantages():
    """Rank r holds episodes r, r + world, ...; the all-reduce gives each rank every return of its groups."""
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.25])
    one = GrpoEstimator(4).episode_advantages(returns, range(8), 8)
    world, parts = 2, {}
    for r in range(world):
        ids = list(range(8))[r::world]
        parts[r] = (ids, returns[ids])

    def all_reduce(x):  # what each rank's all_reduce returns: the sum of every rank's filled vector
        total = torch.zeros(8, dtype=torch.float64)
        for ids, ret in parts.values():
            total[ids] += ret.double()
        return total

    for r in range(world):
        ids, ret = parts[r]
        torch.testing.assert_close(GrpoEstimator(4).episode_advantages(ret, ids, 8, all_reduce), one[ids])


def test_episode_returns_add_the_turn_rewards():
    assert episode_returns([[0.0, 1.0], [], [0.25, 0.25, 0.5]]).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("overrides, needle", [
    (["ppo.advantage=grpo", "rollout.group_size=5"], "rollout.episodes_per_step: expected a multiple of "
                                                     "rollout.group_size=5"),
    (["ppo.advantage=grpo", "rollout.group_size=1"], "rollout.group_size"),
    (["ppo.advantage=grpo", "ppo.value_warmup_steps=2"], "ppo.value_warmup_steps"),
    (["ppo.advantage=vtrace"], "ppo.advantage"),
    (["rollout.group_size=0"], "rollout.group_size"),
])
def test_grpo_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, overrides)
    assert str(e.value).startswith(needle), str(e.value)


def test_group_size_defaults():
    assert load_train_config(None, []).group_size == 1
    assert load_train_config(None, ["ppo.advantage=grpo"]).group_size == 8
    assert load_train_config(None, ["ppo.advantage=grpo", "rollout.group_size=4"]).group_size == 4


TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=1", "eval.at_end=false", "schedule.handover=fixed",
]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOD_FAST_CACHE", str(tmp_path / "cache"))


def test_grpo_trains_the_student_and_not_the_value_head(tmp_path, cache):
    from safetensors.torch import load_file

    from atod_fast.cli import main
    from atod_fast.trainer.loop import Trainer
    from atod_fast.trainer.metrics import read_metrics

    grpo = [*TINY, "ppo.advantage=grpo", "rollout.group_size=3"]
    tr = Trainer(load_train_config(None, [*grpo, f"output_dir={tmp_path / 'x'}"]))
    tr.setup(progress=False)
    trajs = tr.rollout(1)
    assert [t.seed for t in trajs[:3]] == [trajs[0].seed] * 3 and trajs[3].seed != trajs[0].seed
    batch, data = tr.prepare(1, trajs)
    assert "returns" not in data  # no value targets: the value head is not trained
    off = 0
    adv = GrpoEstimator(3).episode_advantages(episode_returns([t.turn_rewards for t in trajs]), range(6), 6)
    for i, n in enumerate(batch.counts):
        assert torch.all(data["advantages"][off:off + n].cpu() == adv[i])
        off += n

    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", *grpo]) == 0
    ck = [run / "checkpoints" / f"step-{s:06d}" for s in (1, 2)]
    v1, v2 = (load_file(str(c / "value_head.safetensors")) for c in ck)
    assert all(torch.equal(v1[k], v2[k]) for k in v1)
    s1, s2 = (load_file(str(c / "student" / "model.safetensors")) for c in ck)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)
    assert all(r["value_loss"] == 0 for r in read_metrics(run))


def test_engines_that_seed_requests_get_distinct_keys_within_a_group(tok_and_lm):
    """play hands sample_keys (not the shared environment seeds) to a generate that seeds each request."""
    from atod_fast.envs import make
    from atod_fast.trainer.rollout import ChatFormat, play, stop_token_ids

    tok, lm = tok_and_lm
    stop = stop_token_ids(lm, tok)
    seen = []

    def generate(prompts, *, episode_seeds, turn, stop_ids, max_new_tokens, temperature):
        seen.append(list(episode_seeds))
        return [[stop[0]] for _ in prompts]

    seeds = group_env_seeds(0, 1, 4, 2)
    keys = sample_keys(seeds, range(4), 2)
    play(lm, tok, ChatFormat(tok, stop), [make("guess_number") for _ in seeds], seeds, max_turns=2,
         max_new_tokens=4, max_episode_tokens=512, temperature=1.0, device=torch.device("cpu"), generate=generate,
         sample_keys=keys)
    assert seen[0] == keys and len(set(keys)) == 4
    with pytest.raises(ValueError, match="sample_keys"):
        play(lm, tok, ChatFormat(tok, stop), [make("guess_number")], [1], max_turns=1, max_new_tokens=4,
             max_episode_tokens=512, temperature=1.0, device=torch.device("cpu"), generate=generate,
             sample_keys=[1, 2])


def test_estimator_on_a_step_batch_gives_no_value_targets():
    from types import SimpleNamespace

    trajs = [SimpleNamespace(turn_rewards=r) for r in ([0.0, 1.0], [0.0], [0.0, 0.0, 1.0], [1.0])]
    batch = SimpleNamespace(trajs=trajs, counts=[2, 1, 3, 1], device=torch.device("cpu"))
    adv, ret = GrpoEstimator(2)(batch, None)
    assert ret is None
    want = GrpoEstimator(2).episode_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), range(4), 4)
    torch.testing.assert_close(adv, want.repeat_interleave(torch.tensor([2, 1, 3, 1])))
    assert adv[:3].tolist() == pytest.approx([0.7071, 0.7071, -0.7071], abs=1e-4) and adv[3:].abs().max() == 0
