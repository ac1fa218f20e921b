"""``fused_logprobs_entropy``: per-token log-prob of the sampled token and entropy, without [N, V] logits.

Every PPO stack needs both; the usual way materializes the full logits (and a float32 copy)
for them. Here the forward keeps only (lse, entropy) per row; the backward recomputes each
chunk's logits, forms d/d(logits) with the per-row upstream gradients and folds it into the
two matmuls, as the chunked ATOD loss does.
"""

from __future__ import annotations

import torch

from .._triton import check_triton_backend, triton_available
from .chunked import Head, choose_chunk_size, mm_acc

LPE_BACKENDS = ("auto", "reference", "torch", "triton", "triton_fused")


def _torch_forward(z, tgt, temperature):
    lp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
    ent = -(lp.exp() * lp).sum(-1)
    lse = (z[:, 0] / temperature) - lp[:, 0]
    return torch.stack([lp.gather(1, tgt[:, None]).squeeze(1), ent, lse])


def _torch_backward(z, tgt, lse, ent, g_lp, g_ent, temperature):
    lp = (z / temperature if temperature != 1.0 else z) - lse[:, None]
    p = lp.exp()
    dz = -p * (g_lp[:, None] + g_ent[:, None] * (lp + ent[:, None]))
    dz.scatter_add_(1, tgt[:, None], g_lp[:, None])
    return torch.mul(dz, 1.0 / temperature, out=z)


def _row_fns(kind):
    if kind == "torch":
        return _torch_forward, _torch_backward, 4
    from atod_fast.kernels.logprobs_entropy import lpe_rows_backward, lpe_rows_forward

    return lpe_rows_forward, lpe_rows_backward, 1


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, temperature, kind):
        fwd, _, buffers = _row_fns(kind)
        dt = torch.float64 if (kind == "torch" and hidden.dtype == torch.float64) else torch.float32
        head = Head(weight, bias, weight.shape[0], dt)
        n = hidden.shape[0]
        chunk = choose_chunk_size(n, weight.shape[0], hidden.shape[1], row_buffers=buffers, device=hidden.device)
        out = torch.empty(3, n, dtype=dt, device=hidden.device)
        for s in range(0, n, chunk):
            out[:, s:s + chunk] = fwd(head.logits(hidden[s:s + chunk]), target_ids[s:s + chunk], temperature)
        ctx.save_for_backward(hidden, weight, bias, target_ids, out[1], out[2])
        ctx.temperature, ctx.kind, ctx.chunk, ctx.dt = temperature, kind, chunk, dt
        return out[0].clone(), out[1].clone()

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, tgt, ent, lse = ctx.saved_tensors
        _, bwd, _ = _row_fns(ctx.kind)
        dt = ctx.dt
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head = Head(weight, bias, weight.shape[0], dt)
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp.to(dt).contiguous()
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.to(dt).contiguous()
        gh = torch.empty(hidden.shape, dtype=dt, device=hidden.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = s + ctx.chunk
            hc = hidden[s:e]
            dz = bwd(head.logits(hc), tgt[s:e], lse[s:e], ent[s:e], g_lp[s:e], g_ent[s:e], ctx.temperature)
            if need_h:
                gh[s:e] = mm_acc(dz, head.w, dt)
            if need_w:
                gw += mm_acc(dz.t(), hc, dt)
            if need_b:
                gb += dz.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(gh, hidden), cast(gw, weight), cast(gb, bias) if bias is not None else None, None, None, None


class _FusedLogprobsEntropy(torch.autograd.Function):
    """``triton_fused``: the ATOD fused kernels with no teacher; c_lp and the entropy weight per row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, temperature):
        from atod_fast.kernels.atod_loss_fused import fused_stats

        from .fused import operands

        hs, ws, bs = operands(weight, bias, hidden.detach(), weight.shape[0])
        stats = fused_stats(hs, ws, bs, None, None, None, target_ids, None, None, teacher="none",
                            divergence="reverse_kl", jsd_beta=0.5, temperature=temperature)
        ctx.save_for_backward(hs, ws, bs, target_ids, stats)
        ctx.temperature = temperature
        ctx.meta = [None if t is None else (t.shape, t.dtype) for t in (hidden, weight, bias)]
        return stats[3].clone(), stats[2].clone()

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        from atod_fast.kernels.atod_loss_fused import fused_grad

        hs, ws, bs, tgt, stats = ctx.saved_tensors
        n = hs.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hs.device)
        c_lp = zeros if g_lp is None else g_lp.float().contiguous()
        ent_coef = zeros if g_ent is None else -g_ent.float().contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = torch.full((1,), 1.0 / ctx.temperature, dtype=torch.float32, device=hs.device)
        gh, gw, gb = fused_grad(hs, ws, bs, None, None, None, tgt, None, None, stats, c_lp, zeros, ent_coef, scale,
                                teacher="none", divergence="reverse_kl", jsd_beta=0.5, temperature=ctx.temperature,
                                need_h=need_h, need_w=need_w, need_b=need_b and bs is not None)
        out = [None if g is None else g.to(m[1]) for g, m in zip((gh, gw, gb), ctx.meta, strict=True)]
        return (*out, None, None)


def fused_logprobs_entropy(hidden, weight, target_ids, *, bias=None, temperature=1.0, backend="auto"):
    """Log-prob of each target token and the entropy of each row's softmax, from hidden states.

    ``z = (hidden @ weightᵀ + bias) / temperature``; ``logprobs[i] = log softmax(z_i)[target_ids[i]]``,
    ``entropy[i] = −Σ_j p_ij log p_ij``. Differentiable w.r.t. hidden, weight and bias; no ``[N, V]``
    tensor is kept between forward and backward (the backward recomputes logits chunk by chunk).

    Args:
        hidden: ``[N, H]`` hidden states.
        weight: ``[V, H]`` LM-head weight.
        target_ids: ``[N]`` int64 token ids in [0, V).
        bias: optional ``[V]`` head bias.
        temperature: logits are divided by it (> 0).
        backend: ``"auto"`` (``"triton"`` on CUDA, else ``"torch"``), ``"reference"`` (full logits),
            ``"torch"``, ``"triton"`` (chunked) or ``"triton_fused"`` (logits only in registers).

    Returns:
        ``(logprobs [N], entropy [N])``, float32 (float64 for float64 inputs on the torch backends).
    """
    for name, t, nd in (("hidden", hidden, 2), ("weight", weight, 2), ("target_ids", target_ids, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D torch.Tensor, got {getattr(t, 'shape', type(t))}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight has H={weight.shape[1]} columns but hidden has H={h}")
    if target_ids.shape[0] != n:
        raise ValueError(f"target_ids has {target_ids.shape[0]} rows but hidden has N={n}")
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids must be an integer tensor (int64), got dtype {target_ids.dtype}")
    if n and bool(((target_ids < 0) | (target_ids >= v)).any()):
        raise ValueError(f"target_ids must be in [0, {v}) (V of weight)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (v,)):
        raise ValueError(f"bias must be a [V]={v} tensor, got {getattr(bias, 'shape', type(bias))}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if backend not in (*LPE_BACKENDS,):
        raise ValueError(f"backend must be one of {list(LPE_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and triton_available() else "torch"
    target_ids = target_ids.long().contiguous()
    if backend == "reference":
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z = hidden.to(dt) @ weight.to(dt).t()
        if bias is not None:
            z = z + bias.to(dt)
        lp = torch.log_softmax(z / temperature, dim=-1)
        return lp.gather(1, target_ids[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)
    if backend.startswith("triton"):
        check_triton_backend(backend, hidden.device)
    if backend == "triton_fused":
        return _FusedLogprobsEntropy.apply(hidden, weight, bias, target_ids, float(temperature))
    return _ChunkedLogprobsEntropy.apply(hidden, weight, bias, target_ids, float(temperature), backend)
