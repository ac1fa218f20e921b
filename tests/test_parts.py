"""The trainer's parts behind their interfaces: λ controller state in checkpoints, plugged-in teacher scorers and
advantage estimators, and the log-probs the trainer computes with the project's own op."""

from __future__ import annotations

import pytest
import torch

from atod_fast.trainer.config import load_train_config
from atod_fast.trainer.metrics import read_metrics

TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "rollout.max_turns=3", "eval.episodes=8",
    "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1", "eval.at_end=false",
]


@pytest.fixture(scope="module", autouse=True)
def teacher_path(private_cache):
    from atod_fast.trainer.loading import teacher_location

    yield teacher_location(load_train_config(None, TINY), progress=False)


class ShrinkingController:
    """A stateful controller: λ of the schedule, scaled down by every step it has seen."""

    def __init__(self, schedule):
        from atod_fast.trainer.lam import ScheduleController

        self.inner = ScheduleController(schedule)
        self.seen: list[int] = []

    @property
    def lambda_max(self) -> float:
        return self.inner.lambda_max

    def _scale(self) -> float:
        return 1.0 / (1 + len(self.seen))

    def lam(self, step, turn_idx):
        return self.inner.lam(step, turn_idx) * self._scale()

    def lambda_turn(self, step, n_turns):
        return [x * self._scale() for x in self.inner.lambda_turn(step, n_turns)]

    def observe(self, step, metrics):
        assert metrics["step"] == step and "loss" in metrics
        self.seen.append(step)

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state["seen"])


def _shrinking(tr):
    from atod_fast.trainer.lam import build_schedule

    return ShrinkingController(build_schedule(tr.cfg, tr.max_turns))


def test_controller_state_round_trips_through_a_checkpoint(tmp_path):
    from atod_fast.trainer.lam import LambdaController
    from atod_fast.trainer.loop import Trainer

    cfg = load_train_config(None, [*TINY, "max_steps=3", "checkpoint.keep_last=3", f"output_dir={tmp_path / 'a'}"])
    a = Trainer(cfg, parts={"controller": _shrinking})
    a.train()
    assert isinstance(a.controller, LambdaController) and a.controller.seen == [1, 2, 3]
    full = read_metrics(tmp_path / "a")

    # Resumed from step 1 in another directory: the controller comes back with what it had seen, so steps 2 and 3
    # get the λ (and the losses) of the uninterrupted run.
    cfg_b = load_train_config(None, [*TINY, "max_steps=3", f"output_dir={tmp_path / 'b'}"])
    b = Trainer(cfg_b, resume=str(tmp_path / "a" / "checkpoints" / "step-000001"), parts={"controller": _shrinking})
    b.setup(progress=False)
    assert b.controller.seen == [1] and b.start_step == 1
    b = Trainer(cfg_b, resume=str(tmp_path / "a" / "checkpoints" / "step-000001"), parts={"controller": _shrinking})
    b.train()
    resumed = read_metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == [2, 3]
    for k in ("lambda_mean", "lambda_turn", "loss", "distill"):
        assert [r[k] for r in resumed] == [r[k] for r in full[1:]], k
    # the scaling did act: step 3's λ of turn 0 is a third of the schedule's
    assert full[2]["lambda_turn"][0] == pytest.approx(b.controller.inner.lambda_turn(3, 1)[0] / 3, abs=1e-6)


def test_schedule_controller_has_no_state():
    from atod_fast.ops.schedule import AnnealSchedule
    from atod_fast.trainer.lam import ScheduleController

    c = ScheduleController(AnnealSchedule(10, 3))
    assert c.state_dict() == {}
    c.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        c.load_state_dict({"x": 1})
    # training step 1 is the schedule's step 0
    assert torch.equal(c.lam(1, torch.tensor([0, 1, 2])), AnnealSchedule(10, 3)(0, torch.tensor([0, 1, 2])))


def test_unknown_part_is_refused():
    from atod_fast.trainer.loop import Trainer

    with pytest.raises(ValueError, match="parts: expected names among"):
        Trainer(load_train_config(None, TINY), parts={"critic": lambda tr: None})


class TopKTeacher:
    """A sparse teacher scorer: the local teacher's top-k log-probs per agent row (no head for the loss)."""

    def __init__(self, model, k: int):
        self.model, self.k, self.calls = model, k, 0

    @torch.no_grad()
    def score(self, batch):
        from atod_fast.trainer.models import lm_head

        self.calls += 1
        h = batch.hidden(self.model, packing="padded")[batch.agent_rows]
        w, _ = lm_head(self.model)
        top = torch.log_softmax(h.float() @ w.float().T, -1).topk(self.k, -1)
        return {"teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values}

    def head(self):
        return None, None

    def gathered(self):
        import contextlib

        return contextlib.nullcontext()


class EpisodeRewardEstimator:
    """Critic-free: every agent token of an episode gets the episode's reward minus the batch mean."""

    needs_values = False

    def __init__(self):
        self.seen_values = []

    def __call__(self, batch, values):
        self.seen_values.append(values)
        r = torch.tensor([t.reward for t in batch.trajs])
        adv = (r - r.mean())[batch.trajectory_of_rows().cpu()].to(batch.device)
        return adv, None


def test_custom_teacher_scorer_and_advantage_estimator_plug_in(tmp_path):
    from atod_fast.trainer.advantages import AdvantageEstimator
    from atod_fast.trainer.loop import Trainer
    from atod_fast.trainer.teacher import TeacherScorer

    cfg = load_train_config(None, [*TINY, "loss.divergence=forward_kl", f"output_dir={tmp_path / 'run'}"])
    tr = Trainer(cfg, parts={"teacher": lambda t: TopKTeacher(t.models.teacher, 4),
                             "advantages": lambda t: EpisodeRewardEstimator()})
    tr.setup(progress=False)
    assert isinstance(tr.teacher, TeacherScorer) and isinstance(tr.advantages, AdvantageEstimator)
    vh = {k: v.clone() for k, v in tr.models.policy.value_head.state_dict().items()}
    lm = {k: v.clone() for k, v in tr.models.policy.lm.state_dict().items()}
    m = tr.step(1)
    assert tr.teacher.calls == 1 and tr.advantages.seen_values == [None]
    assert m["value_loss"] == 0.0 and m["distill"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
    # the value head is not trained without returns; the student is
    assert all(torch.equal(v, tr.models.policy.value_head.state_dict()[k]) for k, v in vh.items())
    assert not all(torch.equal(v, tr.models.policy.lm.state_dict()[k]) for k, v in lm.items())


def test_token_logprobs_equal_full_logits_on_cpu():
    """The fused op (torch backend, one chunk) gives the full-logit log-softmax bit for bit: the trainer's switch
    to it changes no number on the CPU."""
    from atod_fast.trainer.reference import token_logprobs

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(24, 300, bias=False)

        def get_output_embeddings(self):
            return self.out

    torch.manual_seed(0)
    lm = Head()
    h = torch.randn(50, 24)
    targets = torch.randint(0, 300, (50,))
    for temperature in (1.0, 0.7):
        got = token_logprobs(lm, h, targets, temperature=temperature, vocab_size=None, backend="auto")
        logits = (h.float() @ lm.out.weight.float().T) / temperature
        want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        assert torch.equal(got, want), (got - want).abs().max()


def _random_trajectories(seed: int):
    """Episodes with 1-4 turns of 1-5 agent tokens between observations, some truncated, some ending with an agent
    turn, one ended by an environment error."""
    from atod_fast.trainer.rollout import Trajectory

    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    trajs = []
    for b in range(7):
        t = Trajectory(seed=b)
        t._append([rnd(0, 99) for _ in range(rnd(1, 4))], action=False, turn=0)
        n_turns = rnd(1, 4)
        for k in range(n_turns):
            t._append([rnd(0, 99) for _ in range(rnd(1, 5))], action=True, turn=k)
            t.turn_last_token.append(len(t.tokens) - 1)
            t.turn_rewards.append(float(torch.randn((), generator=g)))
            if k < n_turns - 1 or b % 3 == 0:  # b % 3 == 0: truncated after an observation
                t._append([rnd(0, 99) for _ in range(rnd(1, 3))], action=False, turn=k + 1)
        t.end_reason = "turn_limit" if b % 3 == 0 else ("error" if b == 4 else "done")
        trajs.append(t)
    return trajs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_estimator_matches_per_turn_reward_placement(seed):
    """GaeEstimator (rewards placed by turn_rewards_to_tokens) against the placement loop the trainer used to run."""
    from atod_fast import compute_gae
    from atod_fast.trainer.advantages import GaeEstimator
    from atod_fast.trainer.batch import StepBatch
    from atod_fast.trainer.config import DistributedConfig
    from atod_fast.trainer.distributed import Dist

    trajs = _random_trajectories(seed)
    batch = StepBatch.build(trajs, torch.device("cpu"))
    values = torch.randn(int(batch.packed.cu_seqlens[-1]), generator=torch.Generator().manual_seed(seed + 10))
    adv, ret = GaeEstimator(gamma=0.9, lam=0.8, whiten_advantages=False, dist=Dist(DistributedConfig()))(batch, values)

    cu = batch.packed.cu_seqlens
    rows = torch.ones(int(cu[-1]), dtype=torch.bool)
    rows[cu[1:] - 1] = False
    row_pos = rows.nonzero().squeeze(1)
    rewards = torch.zeros(int(cu[-1]))
    for b, t in enumerate(trajs):
        for pos, r in zip(t.turn_last_token, t.turn_rewards, strict=True):
            rewards[int(cu[b]) + pos - 1] += r
    boot = torch.tensor([float(values[int(cu[b + 1]) - 1]) if t.truncated else 0.0 for b, t in enumerate(trajs)])
    act_rows = batch.action_mask[row_pos + 1]
    want_adv, want_ret = compute_gae(rewards[row_pos], values[row_pos], cu - torch.arange(len(trajs) + 1), act_rows,
                                     gamma=0.9, lam=0.8, bootstrap_values=boot)
    assert adv.shape == (sum(batch.counts),) == (int(act_rows.sum()),)
    assert torch.equal(adv, want_adv[act_rows]) and torch.equal(ret, want_ret[act_rows])
    # λ's turn index and the targets line up with the agent tokens, trajectory by trajectory
    agent_turns = [k for t in trajs for k, a in zip(t.turn_idx[1:], t.action_mask[1:], strict=True) if a]
    assert batch.agent_turns.tolist() == agent_turns
    assert batch.targets.tolist() == [x for t in trajs for x, a in zip(t.tokens, t.action_mask, strict=True) if a]
    assert batch.trajectory_of_rows().tolist() == [b for b, n in enumerate(batch.counts) for _ in range(n)]


@pytest.mark.parametrize("cpu_threads", [None, 2])
def test_tiny_models_decode_on_one_thread_and_update_on_the_default(tmp_path, monkeypatch, cpu_threads):
    """``cpu_threads=null``: the token-by-token decoding of the tiny built-in models runs on 1 thread, the batched
    passes (a turn's prefill among them) on torch's process default; a set ``cpu_threads`` holds for both."""
    from atod_fast.trainer import engines
    from atod_fast.trainer.decoding import KvCacheSampler
    from atod_fast.trainer.loop import Trainer

    monkeypatch.setattr("atod_fast.trainer.threads._PROCESS_THREADS", 3)  # whatever the machine's default is
    saved = torch.get_num_threads()
    cfg = load_train_config(None, [*TINY, f"output_dir={tmp_path}", "max_steps=1",
                                   *([] if cpu_threads is None else [f"cpu_threads={cpu_threads}"])])
    try:
        tr = Trainer(cfg)
        tr.setup(progress=False)
        seen = {}
        play, update = engines.play, tr.learner.update

        def rollout(*a, **kw):
            seen["rollout"] = torch.get_num_threads()
            return play(*a, **kw)

        def learn(*a, **kw):
            seen["update"] = torch.get_num_threads()
            return update(*a, **kw)

        forward = KvCacheSampler._forward

        def fed(self, ids, *a):  # a prefill feeds the turn's new tokens; a decode step feeds one token per row
            seen.setdefault("prefill" if ids.shape[1] > 1 else "decode", set()).add(torch.get_num_threads())
            return forward(self, ids, *a)

        monkeypatch.setattr(engines, "play", rollout)
        monkeypatch.setattr(KvCacheSampler, "_forward", fed)
        tr.learner.update = learn
        tr.step(1)
        batched = 3 if cpu_threads is None else cpu_threads
        decode = 1 if cpu_threads is None else cpu_threads
        assert seen == {"rollout": decode, "update": batched, "prefill": {batched}, "decode": {decode}}
        assert torch.get_num_threads() == batched  # restored after the rollout
    finally:
        torch.set_num_threads(saved)


def test_reward_success_trains_on_wins_alone(tmp_path, teacher_path):
    """``rollout.reward=success``: the step's rewards are the episodes' successes (partial credit is gone), and a
    value that is neither is refused by name."""
    from atod_fast.envs import GuessNumberEnv, register, registered
    from atod_fast.trainer.config import ConfigError
    from atod_fast.trainer.loop import Trainer

    class PartialCredit(GuessNumberEnv):  # pays for every turn played, as textarena pays for close guesses
        def step(self, action):
            obs, reward, done, info = super().step(action)
            return obs, reward + 0.25, done, info

    if "test_partial_credit" not in registered():
        register("test_partial_credit", PartialCredit, "guess_number that pays 0.25 per turn")
    over = [*TINY, f"output_dir={tmp_path}", "max_steps=1", "env.name=test_partial_credit",
            f"model.teacher={teacher_path}", "schedule.handover=fixed"]
    for reward in ("env", "success"):
        tr = Trainer(load_train_config(None, [*over, f"rollout.reward={reward}"]))
        tr.setup(progress=False)
        trajs = tr.rollout(1)
        paid = [t.reward for t in trajs]
        if reward == "env":
            assert all(r >= 0.25 for r in paid)
        else:
            assert paid == [float(t.success) for t in trajs]
    m = tr.step(2)
    assert m["reward_mean"] == m["success_rate"]
    with pytest.raises(ConfigError, match=r"rollout\.reward"):
        load_train_config(None, ["rollout.reward=wins"])
