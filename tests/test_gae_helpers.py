"""turn_rewards_to_tokens, masked_whiten, group_advantages against hand-computed and looped answers."""

import itertools

import numpy as np
import pytest
import torch
from gae_cases import random_batch

from atod_fast import compute_gae, group_advantages, masked_whiten, turn_rewards_to_tokens

# trajectory 0: obs obs [act act act] obs [act act] obs [act]; trajectory 1: obs [act act act]
MASK = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
CU = np.array([0, 10, 14])


def test_turn_rewards_on_last_action_token_of_each_turn():
    out = turn_rewards_to_tokens(CU, MASK, turn_rewards=np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]),
                                 final_scores=np.array([10.0, 20.0]))
    expect = np.zeros(14, np.float32)
    expect[[4, 7, 9, 13]] = [1.0, 2.0, 3.0 + 10.0, 4.0 + 20.0]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expect)
    # the result is valid GAE input (no reward on an observation token)
    compute_gae(out, np.zeros(14, np.float32), CU, MASK, backend="torch")


def test_turn_ids_define_turns():
    # one assistant message split by a masked token still counts as one turn when turn_ids say so
    turn_ids = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    out = turn_rewards_to_tokens(torch.from_numpy(CU), torch.from_numpy(MASK), turn_ids=turn_ids,
                                 turn_rewards=torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert isinstance(out, torch.Tensor)
    expect = torch.zeros(14)
    expect[[7, 9, 13]] = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def _loop_turn_rewards(cu, mask, turn_rewards, final_scores):
    out = np.zeros(len(mask))
    for b in range(len(cu) - 1):
        runs, prev = [], False
        for i in range(cu[b], cu[b + 1]):
            if mask[i] and not prev:
                runs.append([i])
            elif mask[i]:
                runs[-1].append(i)
            prev = mask[i]
        for k, run in enumerate(runs):
            if k < turn_rewards.shape[1]:
                out[run[-1]] += turn_rewards[b, k]
        if runs:
            out[runs[-1][-1]] += final_scores[b]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_turn_rewards_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 60, size=7)
    _, _, cu, mask = random_batch(rng, lengths)
    n_runs = [int((mask[s:e] & ~np.concatenate([[False], mask[s:e - 1]])).sum()) for s, e in itertools.pairwise(cu)]
    K = max([*n_runs, 1]) + 2
    tr = rng.standard_normal((len(lengths), K)) * (np.arange(K)[None, :] < np.array(n_runs)[:, None])
    fs = rng.standard_normal(len(lengths)) * (np.array(n_runs) > 0)
    out = turn_rewards_to_tokens(cu, mask, turn_rewards=tr, final_scores=fs)
    np.testing.assert_allclose(out, _loop_turn_rewards(cu, mask, tr, fs), rtol=1e-6, atol=1e-6)


def test_turn_rewards_errors():
    with pytest.raises(ValueError, match=r"turn_rewards\[1, 1\] = 5.0 but trajectory 1 has 1 turn"):
        turn_rewards_to_tokens(CU, MASK, turn_rewards=np.array([[0.0, 0.0], [0.0, 5.0]]))
    with pytest.raises(ValueError, match=r"final_scores\[1\] = 1.0 but trajectory 1 has no action token"):
        turn_rewards_to_tokens(CU, np.where(np.arange(14) < 10, MASK, False), final_scores=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"turn_rewards must be 2-D \[B, K\] with B = 2"):
        turn_rewards_to_tokens(CU, MASK, turn_rewards=np.zeros(2))
    with pytest.raises(ValueError, match=r"final_scores must be 1-D \[B\] with B = 2"):
        turn_rewards_to_tokens(CU, MASK, final_scores=np.zeros(3))
    with pytest.raises(ValueError, match=r"cu_seqlens must end at T = 14"):
        turn_rewards_to_tokens(np.array([0, 13]), MASK, final_scores=np.zeros(1))
    with pytest.raises(ValueError, match=r"turn_ids must hold integers"):
        turn_rewards_to_tokens(CU, MASK, turn_rewards=np.zeros((2, 1)), turn_ids=np.zeros(14))


def test_masked_whiten():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50).astype(np.float32) * 3 + 2
    mask = rng.random(50) < 0.6
    sel = x[mask].astype(np.float64)
    expect = np.where(mask, (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)
    out = masked_whiten(x, mask)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    out_t = masked_whiten(torch.from_numpy(x), torch.from_numpy(mask), shift_mean=False)
    np.testing.assert_allclose(out_t.numpy(), np.where(mask, x / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0), rtol=1e-5)
    assert (masked_whiten(x, np.zeros(50, bool)) == 0).all()
    one = np.zeros(50, bool)
    one[3] = True
    assert (masked_whiten(x, one) == 0).all()
    with pytest.raises(ValueError, match=r"mask has shape"):
        masked_whiten(x, mask[:-1])
    with pytest.raises(ValueError, match=r"mask must be a bool array"):
        masked_whiten(x, mask.astype(np.int64))


def test_group_advantages():
    scores = np.array([1.0, 2.0, 3.0, 5.0, 0.5, 0.5, 7.0])
    groups = np.array([10, 10, 10, -3, 4, 4, 99])
    out = group_advantages(scores, groups)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and np.isfinite(out).all()
    g0 = scores[:3]
    np.testing.assert_allclose(out[:3], (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-6), rtol=1e-6)
    assert out[3] == 0 and out[6] == 0          # singleton groups
    assert out[4] == 0 and out[5] == 0          # all-equal group
    raw = group_advantages(torch.tensor(scores), torch.tensor(groups), normalize_std=False)
    assert isinstance(raw, torch.Tensor)
    np.testing.assert_allclose(raw.numpy()[:3], g0 - g0.mean(), rtol=1e-6)
    assert np.isfinite(group_advantages(scores, groups, eps=0.0)).all()
    with pytest.raises(ValueError, match=r"group_ids has shape"):
        group_advantages(scores, groups[:-1])
    with pytest.raises(ValueError, match=r"group_ids must hold integers"):
        group_advantages(scores, groups.astype(np.float64))
    with pytest.raises(ValueError, match=r"scores must be finite"):
        group_advantages(np.array([np.nan, 1.0]), np.array([0, 0]))
