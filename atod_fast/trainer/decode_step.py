"""One token-by-token decode step of a Llama-family model without transformers' per-call machinery.

A rollout feeds one token per episode through the student some 35 times per turn batch. With the tiny
models of the default run on the CPU, a third of transformers' forward for that one token is spent outside
the ops: mask construction, cache objects, output capture, keyword plumbing. :func:`decode_step` calls the
model's own modules (embedding, rotary embedding, norms, projections, MLP, head) and does the rest with the
ops transformers uses, in its order: the rotary product, the cache concatenation, SDPA with the padding
mask (none when no key is padding, as transformers decides). So its logits are bit for bit those of the
full forward; ``tests/test_decoding.py`` holds it to that on the installed transformers. Where the model
is not one of these (other architectures, grouped-query heads, another attention), callers keep
``lm(...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")
"""Decoder layers of the shape norm → attention (q, k, v, o projections, rotary) → norm → MLP, residuals."""


def _causal_lm(lm):
    """The transformers causal LM in ``lm``: a peft wrapper's base model (adapters stay in its layers), or ``lm``."""
    base = getattr(lm, "get_base_model", None)
    return base() if callable(base) else lm


def supports_decode_step(lm) -> bool:
    """Whether :func:`decode_step` reproduces ``lm``'s forward (in eval mode): a supported architecture with SDPA
    attention, no sliding window and as many key/value heads as query heads (transformers packs grouped heads its
    own way)."""
    cfg, base = getattr(lm, "config", None), _causal_lm(lm)
    return (cfg is not None and cfg.model_type in SUPPORTED and cfg._attn_implementation == "sdpa"
            and cfg.num_key_value_heads == cfg.num_attention_heads and getattr(cfg, "sliding_window", None) is None
            and hasattr(base, "lm_head") and hasattr(getattr(base, "model", None), "rotary_emb"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def decode_step(lm, cache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Feeds ``ids [B, 1]`` after the keys and values in ``cache`` (a transformers ``DynamicCache``, extended in
    place); ``mask [B, S + 1]`` 1 on the real tokens so far, ``positions [B, 1]``. -> logits ``[B, V]`` in the
    model's dtype."""
    lm = _causal_lm(lm)
    model = lm.model
    h = model.embed_tokens(ids)
    cos, sin = model.rotary_emb(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    b = ids.shape[0]
    pad = None if bool(mask.all()) else mask.bool()[:, None, None, :]
    for layer, kv in zip(model.layers, cache.layers, strict=True):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (b, 1, -1, attn.head_dim)
        q = _rotate(attn.q_proj(x).view(shape).transpose(1, 2), cos, sin)
        k = _rotate(attn.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        kv.keys = torch.cat([kv.keys, k], dim=-2)
        kv.values = torch.cat([kv.values, attn.v_proj(x).view(shape).transpose(1, 2)], dim=-2)
        o = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=pad, scale=attn.scaling)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return lm.lm_head(model.norm(h))[:, -1]
