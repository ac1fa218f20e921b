"""Adaptive turn weights: the formula, its bounds, the hand-over's hold, the state, and a resumed run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from atod_fast.ops.schedule import AnnealSchedule
from atod_fast.trainer.config import ConfigError, load_train_config
from atod_fast.trainer.handover import HandoverController
from atod_fast.trainer.lam import ScheduleController
from atod_fast.trainer.turn_weights import AdaptiveTurnController


def _adaptive(base=None, horizon=4, ema=0.5, lo=0.1, hi=0.9):
    base = base or ScheduleController(AnnealSchedule(100, horizon, time_decay="constant", turn_decay="cosine"))
    return AdaptiveTurnController(base, turn_horizon=horizon, lambda_min=lo, lambda_max=hi, ema=ema)


def _stats(distill, entropy, **extra):
    return {"success_rate": 0.0, "distill": 0.0, "turn_distill": distill, "turn_teacher_entropy": entropy, **extra}


def test_weights_follow_disagreement_and_teacher_certainty():
    c = _adaptive()
    turns = torch.arange(4)
    # No statistics yet: every turn gets λ of turn 0 (the turn decay of the wrapped schedule is replaced).
    assert torch.allclose(c.lam(1, turns), torch.full((4,), 0.9))
    c.observe(1, _stats([0.4, 0.4, 0.1, None], [0.0, 2.0, 0.0, None]))
    s = torch.tensor([0.4, 0.4 * math.exp(-2.0), 0.1], dtype=torch.float64)
    w = (s / s.mean()).float()
    assert torch.allclose(c.weights(), torch.cat([w, torch.ones(1)]))  # turn 3 unseen: weight 1
    lam = c.lam(2, turns)
    assert torch.allclose(lam, (0.9 * torch.cat([w, torch.ones(1)])).clamp(0.1, 0.9))
    # Same disagreement, unsure teacher: less teacher weight; the confident turn is capped at lambda_max.
    assert lam[1] < lam[0] and lam[0] == pytest.approx(0.9)
    assert lam[2] < lam[0]  # the student imitates turn 2 better than turn 0
    assert c.metrics()["turn_weights"] == pytest.approx(c.weights().tolist(), abs=1e-6)


def test_moving_average_bounds_and_late_turns():
    c = _adaptive(ema=0.5, lo=0.2, hi=0.8)
    c.observe(1, _stats([1.0, 1.0, 1.0, 1.0], [0.0] * 4))
    c.observe(2, _stats([0.0, 1.0, 1.0, 1.0], [0.0] * 4))
    assert c.disagreement == pytest.approx([0.5, 1.0, 1.0, 1.0])
    # Turns past the horizon share its last bucket: here turns 3..5 (means 1, 0, 1 averaged equally).
    c.observe(3, _stats([0.5, 1.0, 1.0, 1.0, 0.0, 1.0], [0.0] * 6))
    assert c.disagreement[3] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    lam = c.lam(4, torch.tensor([0, 1, 2, 3, 7, 9]))
    assert lam.min() >= 0.2 - 1e-7 and lam.max() <= 0.8 + 1e-7
    assert lam[4] == lam[5] == lam[3]
    # Negative one-sample divergences (sampled_reverse_kl) count as agreement, never as negative weight.
    c2 = _adaptive()
    c2.observe(1, _stats([-0.5, 0.5, 0.5, 0.5], [0.0] * 4))
    assert c2.weights()[0] == 0 and (c2.lam(2, torch.tensor([0])) == 0.1).all()


def test_skipped_step_and_no_disagreement_leave_weights_at_one():
    c = _adaptive()
    c.observe(1, _stats([None] * 4, [None] * 4))
    c.observe(2, {"success_rate": 0.0})
    assert torch.equal(c.weights(), torch.ones(4))
    c.observe(3, _stats([0.0] * 4, [1.0] * 4))  # all s_τ = 0: nothing to prefer
    assert torch.equal(c.weights(), torch.ones(4))


def test_the_handover_holds_lambda_max_on_every_turn_until_its_anneal():
    base = HandoverController(turn_horizon=4, max_steps=50, teacher_success=0.5, gate_window=1, gate_ratio=1.0,
                              lambda_max=0.9, lambda_min=0.1, anneal_steps=10)
    c = _adaptive(base)
    c.observe(1, _stats([1.0, 0.1, 0.1, 0.1], [0.0] * 4, success_rate=0.0))
    assert base.handover_step is None and torch.equal(c.lam(2, torch.arange(4)), torch.full((4,), 0.9))
    c.observe(2, _stats([1.0, 0.1, 0.1, 0.1], [0.0] * 4, success_rate=1.0))
    assert base.handover_step == 2
    lam = c.lam(3, torch.arange(4))  # anneal step 0: λ_t = 0.9, the weights shape the turns
    assert lam[0] == pytest.approx(0.9) and (lam[1:] < 0.9).all()
    assert c.metrics()["handover_step"] == 2


def test_state_round_trips_through_json():
    c = _adaptive(HandoverController(turn_horizon=4, max_steps=50, teacher_success=0.5, gate_window=1))
    c.observe(1, _stats([0.3, 0.2, None, 0.1], [1.0, 0.5, None, 2.0], success_rate=1.0))
    state = json.loads(json.dumps(c.state_dict()))
    d = _adaptive(HandoverController(turn_horizon=4, max_steps=50, teacher_success=0.5, gate_window=1))
    d.load_state_dict(state)
    assert torch.equal(c.lam(5, torch.arange(6)), d.lam(5, torch.arange(6)))
    assert d.base.handover_step == 1
    with pytest.raises(ValueError, match="turn_horizon"):
        _adaptive(horizon=3).load_state_dict(state)


@pytest.mark.parametrize(("override", "needle"), [
    (["schedule.turn_weighting=sideways"], "schedule.turn_weighting"),
    (["schedule.mode=opd", "schedule.turn_weighting=adaptive"], "schedule.turn_weighting"),
    (["schedule.turn_ema=1"], "schedule.turn_ema"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_train_config(None, override)


# ---------------------------------------------------------------------------- end to end (tiny models, CPU)
TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "eval.episodes=8", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=1", "checkpoint.keep_last=10", "eval.at_end=false",
    "schedule.turn_weighting=adaptive", "schedule.handover=fixed", "schedule.total_steps=3",
]


def test_adaptive_run_logs_its_statistics_and_resumes_exactly(tmp_path, private_cache):
    from atod_fast.cli import main
    from atod_fast.trainer.metrics import read_metrics

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--output-dir", str(a), "--max-steps", "3", *TINY]) == 0
    assert main(["train", "--output-dir", str(b), "--max-steps", "2", *TINY]) == 0
    assert main(["train", "--output-dir", str(b), "--max-steps", "3", "--resume", "auto", *TINY]) == 0
    la, lb = read_metrics(a), read_metrics(b)
    for key in ("loss", "lambda_mean", "lambda_turn", "turn_weights", "turn_distill", "turn_teacher_entropy"):
        assert [r[key] for r in la] == [r[key] for r in lb], key
    first = la[0]
    assert len(set(first["lambda_turn"])) == 1  # no statistics before the first update: one λ for every turn
    assert any(d is not None and d > 0 for d in first["turn_distill"])
    assert all(h is None or h > 0 for h in first["turn_teacher_entropy"])
    assert first["teacher_entropy"] > 0
    # Logged after the step (like lr): the weights of the next step, which step 1's statistics reshaped.
    assert first["turn_weights"] != [1.0] * len(first["turn_weights"])
    assert len(set(la[1]["lambda_turn"])) > 1
