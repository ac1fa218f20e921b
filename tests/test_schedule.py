import math

import pytest
import torch

from atod_fast import AnnealSchedule


def formula(t, tau, total, horizon, lmax, lmin, time_decay, turn_decay):
    decays = {
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "linear": lambda p: 1 - p,
        "exponential": lambda p: (math.exp(-5 * p) - math.exp(-5)) / (1 - math.exp(-5)),
        "constant": lambda p: 1.0,
    }
    p_t = min(max(t / total, 0.0), 1.0)
    p_tau = 0.0 if horizon == 1 else min(max(tau / (horizon - 1), 0.0), 1.0)
    return lmin + (lmax - lmin) * decays[time_decay](p_t) * decays[turn_decay](p_tau)


def test_ten_turn_horizon_at_step_zero():
    lam = AnnealSchedule(100, 10)(0, torch.arange(10))
    assert lam.dtype == torch.float32 and lam.shape == (10,)
    expected = [0.9, 0.876, 0.806, 0.7, 0.570, 0.430, 0.3, 0.194, 0.124, 0.1]
    assert lam.tolist() == pytest.approx(expected, abs=6e-4)


def test_corners():
    s = AnnealSchedule(50, 4, lambda_max=0.8, lambda_min=0.2)
    assert float(s(0, torch.tensor(0))) == pytest.approx(0.8)
    assert float(s(0, torch.tensor(3))) == pytest.approx(0.2)
    # End of training (and beyond): every turn at the floor.
    assert s(50, torch.arange(4)).tolist() == pytest.approx([0.2] * 4)
    assert s(10_000, torch.arange(4)).tolist() == pytest.approx([0.2] * 4)
    # Turns past the horizon stay at the last turn's value.
    assert float(s(0, torch.tensor(9))) == pytest.approx(0.2)
    # Midway in time, the first turn is halfway between the bounds (cosine at p = 1/2).
    assert float(s(25, torch.tensor(0))) == pytest.approx(0.5)


@pytest.mark.parametrize("time_decay", ["cosine", "linear", "exponential", "constant"])
@pytest.mark.parametrize("turn_decay", ["cosine", "linear", "exponential", "constant"])
def test_matches_formula(time_decay, turn_decay):
    s = AnnealSchedule(37, 6, lambda_max=0.95, lambda_min=0.05, time_decay=time_decay, turn_decay=turn_decay)
    turns = torch.tensor([[0, 1, 2], [3, 5, 8]])
    for t in (0, 1, 10, 36, 37, 100):
        got = s(t, turns)
        assert got.shape == turns.shape and got.dtype == torch.float32
        want = [[formula(t, tau, 37, 6, 0.95, 0.05, time_decay, turn_decay) for tau in row] for row in turns.tolist()]
        assert got.tolist() == [pytest.approx(r, abs=1e-6) for r in want]


def test_horizon_one_has_no_turn_decay():
    s = AnnealSchedule(10, 1)
    assert s(0, torch.arange(5)).tolist() == pytest.approx([0.9] * 5)


def test_presets():
    turns = torch.arange(7)
    for step in (0, 3, 1000):
        assert AnnealSchedule.opd(10, 5)(step, turns).tolist() == [1.0] * 7
        assert AnnealSchedule.rl(10, 5)(step, turns).tolist() == [0.0] * 7


def test_device_and_shape_follow_input():
    turns = torch.zeros(2, 3, 4, dtype=torch.int32)
    assert AnnealSchedule(5, 3)(1, turns).shape == (2, 3, 4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(total_steps=0, turn_horizon=3), "total_steps"),
        (dict(total_steps=10, turn_horizon=0), "turn_horizon"),
        (dict(total_steps=10, turn_horizon=3, lambda_max=1.5), "lambda_max"),
        (dict(total_steps=10, turn_horizon=3, lambda_min=-0.1), "lambda_min"),
        (dict(total_steps=10, turn_horizon=3, lambda_min=0.6, lambda_max=0.5), "lambda_min"),
        (dict(total_steps=10, turn_horizon=3, time_decay="cosin"), "time_decay"),
        (dict(total_steps=10, turn_horizon=3, turn_decay="step"), "turn_decay"),
        (dict(total_steps=2.5, turn_horizon=3), "total_steps"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AnnealSchedule(**kwargs)


def test_call_validation():
    s = AnnealSchedule(10, 3)
    with pytest.raises(ValueError, match="turn_idx"):
        s(0, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="step"):
        s(1.5, torch.tensor([0]))
