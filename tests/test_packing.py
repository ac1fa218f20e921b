"""Packed (position-id) and padded forward passes give the same hidden states."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from atod_fast.trainer.packing import last_hidden_states, pack, resolve_mode


def tiny(cls, cfg_cls):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


@pytest.mark.parametrize("cls, cfg_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_packed_equals_padded_equals_one_by_one(cls, cfg_cls):
    model = tiny(cls, cfg_cls)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 17, 1, 9)]
    p = pack(seqs)
    assert p.cu_seqlens.tolist() == [0, 5, 22, 23, 32]
    with torch.no_grad():
        packed = last_hidden_states(model.model, p, mode="packed")
        padded = last_hidden_states(model.model, p, mode="padded")
        alone = torch.cat([model.model(input_ids=s[None]).last_hidden_state[0] for s in seqs])
    assert packed.shape == padded.shape == (32, 64)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_packed_gradients_match_padded():
    model = tiny(LlamaForCausalLM, LlamaConfig)
    seqs = [torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8, 9])]
    grads = []
    for mode in ("packed", "padded"):
        model.zero_grad()
        last_hidden_states(model.model, pack(seqs), mode=mode).square().sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_auto_mode_and_errors():
    model = tiny(LlamaForCausalLM, LlamaConfig)
    assert resolve_mode(model.model) == "padded"
    model.config._attn_implementation = "flash_attention_2"
    assert resolve_mode(model) == "packed"
    with pytest.raises(ValueError, match="mode"):
        resolve_mode(model, "ragged")
    with pytest.raises(ValueError, match=r"sequences\[1\] is empty"):
        pack([torch.tensor([1]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="at least one"):
        pack([])


def test_length_buckets_split_only_where_padding_outweighs_a_call():
    from atod_fast.trainer.packing import length_buckets

    lengths = [100, 3, 98, 4, 100, 5, 99, 3]
    groups = length_buckets(lengths, call_tokens=50)
    assert sorted(i for g in groups for i in g) == list(range(8))  # a partition of the sequences
    assert [sorted(lengths[i] for i in g) for g in groups] == [[3, 3, 4, 5], [98, 99, 100, 100]]
    assert length_buckets(lengths, call_tokens=500) == [sorted(range(8), key=lambda i: lengths[i])]  # not worth it
    assert length_buckets([7] * 5, call_tokens=0) == [[0, 1, 2, 3, 4]]  # equal lengths never split
    assert len(length_buckets(list(range(1, 40)), call_tokens=0, max_buckets=3)) == 3
    assert length_buckets([]) == [[]]


def test_padded_buckets_equal_one_by_one_and_packed_gradients():
    """Lengths far apart run as separate padded batches; rows come back in the packed order, and the gradients
    match the packed pass's."""
    from atod_fast.trainer.packing import length_buckets

    model = tiny(LlamaForCausalLM, LlamaConfig)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (120, 3, 118, 4, 2, 119)]
    p = pack(seqs)
    assert len(length_buckets(p.lengths)) == 2
    with torch.no_grad():
        padded = last_hidden_states(model.model, p, mode="padded")
        alone = torch.cat([model.model(input_ids=s[None]).last_hidden_state[0] for s in seqs])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    grads = []
    for mode in ("packed", "padded"):
        model.zero_grad()
        last_hidden_states(model.model, p, mode=mode).square().sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
