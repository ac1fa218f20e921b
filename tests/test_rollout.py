"""Multi-turn rollouts: token bookkeeping, the chat template per turn, and episode endings."""

from __future__ import annotations

import torch
from rollout_cases import turn_spans

from atod_fast.envs import GuessNumberEnv, make
from atod_fast.trainer.rollout import ChatFormat, play, stop_token_ids


def test_chat_format_matches_the_rendered_conversation(tok_and_lm):
    """Per-turn pieces, glued with the agent's own tokens, are exactly the template's rendering."""
    tok, lm = tok_and_lm
    fmt = ChatFormat(tok, stop_token_ids(lm, tok))
    eos = tok.eos_token_id
    obs = ["Guess the number between 1 and 31. You have 5 guesses.", "Higher.", "Lower.", "Invalid guess (no number)"]
    actions = ["16", "24", "twenty"]
    ids = fmt.first(obs[0])
    messages = [{"role": "user", "content": obs[0]}]
    for a, o in zip(actions, obs[1:], strict=True):
        ids += tok(a, add_special_tokens=False)["input_ids"] + [eos]
        ids += fmt.after_action(o, eos)
        messages += [{"role": "assistant", "content": a}, {"role": "user", "content": o}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == rendered
    # A turn cut by the token limit (no end token sampled) gets the end-of-turn marker from the template.
    cut = fmt.after_action("Higher.", None)
    assert tok.convert_ids_to_tokens(cut)[0] == "<|end|>"


def _check_bookkeeping(t, tok, fmt, max_new_tokens):
    n = len(t.tokens)
    assert len(t.action_mask) == len(t.turn_idx) == n
    spans = turn_spans(t)
    assert len(spans) == t.num_turns == len(t.actions) == len(t.turn_last_token)
    for k, (s, e) in enumerate(spans):
        assert e - s <= max_new_tokens
        assert t.turn_last_token[k] == e - 1
        assert set(t.turn_idx[s:e]) == {k}
        ids = t.tokens[s:e]
        body = ids[:-1] if ids[-1] in fmt.stop_ids else ids
        assert tok.decode(body, skip_special_tokens=True) == t.actions[k]


def test_play_records_tokens_masks_turns_and_endings(tok_and_lm):
    tok, lm = tok_and_lm
    fmt = ChatFormat(tok, stop_token_ids(lm, tok))
    seeds = list(range(6))
    torch.manual_seed(0)
    trajs = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, max_turns=3, max_new_tokens=4,
                 max_episode_tokens=1024, temperature=1.0, device=torch.device("cpu"))
    for t in trajs:
        _check_bookkeeping(t, tok, fmt, 4)
        assert t.end_reason in ("done", "turn_limit")
        assert t.num_turns <= 3
    assert any(t.end_reason == "turn_limit" and t.truncated for t in trajs)
    # The same seeds and sampling seed give the same episodes.
    torch.manual_seed(0)
    again = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, max_turns=3, max_new_tokens=4,
                 max_episode_tokens=1024, temperature=1.0, device=torch.device("cpu"))
    assert [t.tokens for t in trajs] == [t.tokens for t in again]


def test_token_budget_and_env_errors_end_episodes(tok_and_lm):
    tok, lm = tok_and_lm
    fmt = ChatFormat(tok, stop_token_ids(lm, tok))

    class Broken(GuessNumberEnv):
        def step(self, action):
            raise ValueError("boom")

    first = len(fmt.first(make("guess_number").reset(0)))
    trajs = play(lm, tok, fmt, [make("guess_number"), Broken()], [0, 1], max_turns=50, max_new_tokens=4,
                 max_episode_tokens=first + 4 + 12, temperature=1.0, device=torch.device("cpu"))
    t = trajs[0]
    if t.end_reason != "done":  # no turn starts unless its longest reply fits in the budget
        assert t.end_reason == "token_budget" and t.truncated
        last_start = max(i for i, a in enumerate(t.action_mask) if a and not t.action_mask[i - 1])
        assert last_start + 4 <= first + 16 < len(t.tokens) + 4
    assert trajs[1].end_reason == "error" and not trajs[1].success and "ValueError: boom" in trajs[1].error
    assert trajs[1].turn_rewards == [0.0] and not trajs[1].truncated


def test_success_rewards_replace_partial_credit():
    from atod_fast.trainer.rollout import Trajectory, success_rewards

    won, lost, cut, errored = (Trajectory(seed=s) for s in range(4))
    won.turn_rewards, won.success = [0.0, 0.2, 1.0], True
    lost.turn_rewards, lost.success = [0.0, 0.7], False  # partial credit for a close guess
    cut.turn_rewards, cut.success = [0.0, 0.0], False
    errored.turn_rewards = []
    success_rewards([won, lost, cut, errored])
    assert [t.turn_rewards for t in (won, lost, cut, errored)] == [[0.0, 0.0, 1.0], [0.0, 0.0], [0.0, 0.0], []]
    assert [t.reward for t in (won, lost)] == [1.0, 0.0]
