"""The KV-cache sampler kept across turns samples the episodes ``lm.generate`` samples."""

from __future__ import annotations

import copy

import pytest
import torch
from rollout_cases import turn_spans

from atod_fast.envs import make
from atod_fast.trainer.config import TinyArch
from atod_fast.trainer.decoding import KvCacheSampler, supports_kv_reuse
from atod_fast.trainer.models import tiny_llama
from atod_fast.trainer.rollout import ChatFormat, play, stop_token_ids


def _episodes(lm, tok, seeds, *, sampler: bool, temperature: float, max_new_tokens: int = 6, max_turns: int = 5):
    fmt = ChatFormat(tok, stop_token_ids(lm, tok))
    gen = KvCacheSampler(lm, pad=tok.pad_token_id, device=torch.device("cpu")) if sampler else None
    torch.manual_seed(1234)
    trajs = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, max_turns=max_turns,
                 max_new_tokens=max_new_tokens, max_episode_tokens=1024, temperature=temperature,
                 device=torch.device("cpu"), generate=gen)
    return trajs, torch.rand(1).item()  # the generator's state after the rollout


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_same_trajectories_as_generate(tok_and_lm, temperature):
    tok, lm = tok_and_lm
    seeds = list(range(10))
    ref, ref_rng = _episodes(lm, tok, seeds, sampler=False, temperature=temperature)
    got, got_rng = _episodes(lm, tok, seeds, sampler=True, temperature=temperature)
    assert sum(t.num_turns for t in ref) > len(seeds)  # several turns: the cache is reused
    assert len({t.end_reason for t in ref}) >= 1
    for a, b in zip(ref, got, strict=True):
        assert a.tokens == b.tokens
        assert a.action_mask == b.action_mask and a.turn_idx == b.turn_idx
        assert a.turn_rewards == b.turn_rewards and a.end_reason == b.end_reason
    assert ref_rng == got_rng  # the global generator advanced alike


def test_same_trajectories_when_rows_stop_within_a_turn(tok_and_lm):
    """Many stop ids: rows finish at different steps of a turn, and some turns end before max_new_tokens."""
    tok, _ = tok_and_lm
    lm = tiny_llama(TinyArch(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok, seed=3)
    lm.generation_config.eos_token_id = [tok.eos_token_id, *range(100, 140)]
    seeds = list(range(8))
    ref, ref_rng = _episodes(lm, tok, seeds, sampler=False, temperature=1.0, max_new_tokens=8)
    got, got_rng = _episodes(lm, tok, seeds, sampler=True, temperature=1.0, max_new_tokens=8)
    lengths = [e - s for t in ref for s, e in turn_spans(t)]
    assert min(lengths) < 8 and max(lengths) == 8
    assert [t.tokens for t in ref] == [t.tokens for t in got]
    assert ref_rng == got_rng


def test_hidden_states_through_the_cache_equal_a_full_forward(tok_and_lm):
    tok, lm = tok_and_lm
    s = KvCacheSampler(lm, pad=tok.pad_token_id, device=torch.device("cpu"))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    first = s(prompts, episode_seeds=[0, 1], turn=0, stop_ids=[tok.eos_token_id], max_new_tokens=3, temperature=1.0)
    longer = [p + o + [12, 13] for p, o in zip(prompts, first, strict=True)]
    s._align(longer[1:], [1])  # episode 0 ended: its row is dropped
    got = s._feed_new(longer[1:])
    with torch.no_grad():
        want = lm(input_ids=torch.tensor([longer[1]])).logits[:, -1].float()
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-5


def test_which_models_reuse_the_cache(tok_and_lm):
    _, lm = tok_and_lm
    assert supports_kv_reuse(lm)
    assert not supports_kv_reuse(torch.nn.Linear(2, 2))


def _prefilled(lm, holes: bool):
    """A cache after a left-padded prefill of 3 rows (no padding when not ``holes``), with the next step's inputs."""
    torch.manual_seed(0)
    b, w, vocab = 3, 7, lm.config.vocab_size
    ids = torch.randint(0, vocab, (b, w))
    mask = torch.ones(b, w, dtype=torch.long)
    if holes:
        mask[0, :3] = 0
        mask[2, :1] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True).cache
    nxt = torch.randint(0, vocab, (b, 1))
    return cache, nxt, torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1), pos[:, -1:] + 1


def _qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg).eval()  # q, k, v projections with biases


def _lora(lm):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lm = peft.get_peft_model(copy.deepcopy(lm), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # peft starts B at 0 (an identity adapter): make the adapters count
    return lm.eval()


@pytest.mark.parametrize("holes", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama+lora"])
def test_decode_step_is_bitwise_the_full_forward(tok_and_lm, arch, holes):
    """The lean one-token step and transformers' forward give the same logits and cache, bit for bit, with padding in
    the cache (a mask) and without (transformers then passes none); a peft-wrapped student keeps its adapters."""
    from atod_fast.trainer.decode_step import decode_step, supports_decode_step

    tok, lm = tok_and_lm
    lm = {"llama": lambda: lm.eval(), "qwen2": lambda: _qwen2(tok), "llama+lora": lambda: _lora(lm)}[arch]()
    assert supports_decode_step(lm)
    cache, nxt, mask, pos = _prefilled(lm, holes)
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad():
        ref = lm(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=ref_cache, use_cache=True,
                 logits_to_keep=1).logits[:, -1]
        tri = decode_step(lm, cache, nxt, mask, pos)
    assert torch.equal(tri, ref)
    for a, b in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_decode_step_only_where_it_reproduces_the_model(tok_and_lm):
    from transformers import LlamaForCausalLM

    from atod_fast.trainer.decode_step import supports_decode_step

    tok, lm = tok_and_lm
    assert KvCacheSampler(lm, pad=tok.pad_token_id, device=torch.device("cpu")).lean
    for change in ({"num_key_value_heads": 1}, {"_attn_implementation": "eager"}):
        cfg = copy_config(lm.config, **change)
        other = LlamaForCausalLM(cfg)
        assert not supports_decode_step(other)
        assert not KvCacheSampler(other, pad=tok.pad_token_id, device=torch.device("cpu")).lean
    assert not supports_decode_step(torch.nn.Linear(2, 2))


def copy_config(cfg, **change):
    cfg = copy.deepcopy(cfg)
    for k, v in change.items():
        setattr(cfg, k, v)
    return cfg
