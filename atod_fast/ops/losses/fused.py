"""The ``triton_fused`` backend: no logits in memory at all, not even a chunk's.

The forward kernel returns 9 statistics per live row; the per-row PPO / k3 / λ terms are then
O(N) work done here with the same ``ppo_rows`` as the torch backend. The backward kernel
recomputes the logits tiles and accumulates the gradients; it needs grad_output, so it runs in
the backward (unlike the chunked backends, which form the gradient in the forward). A dense
teacher given as ``teacher_logits`` is read by both kernels tile by tile, in place of forming
its tiles from hidden states.

A sampled teacher (``sampled_reverse_kl``) needs no kernel support: its D depends on the target's
log-prob only, so the kernels run without a teacher and λ·D reaches the gradient through c_lp.
"""

from __future__ import annotations

import torch

from atod_fast.kernels.codes import OUT_FIELDS

from .inputs import LossInputs
from .rowwise import ppo_rows, sampled_rows


def operands(weight, bias, hidden, vocab):
    """Head rows in use and the hidden states in one matmul dtype (float64 runs in float32).

    Off CUDA the kernels run in Triton's interpreter, whose bf16 ``tl.dot`` is not usable: bf16
    operands are widened to float32 there (exactly), so only CUDA exercises the bf16 tensor-core path.
    """
    w = weight.detach()[:vocab]
    if w.dtype == torch.float64 or (w.dtype == torch.bfloat16 and not w.is_cuda):
        w = w.float()
    b = None if bias is None else bias.detach()[:vocab].float()
    return hidden.to(w.dtype), w, b


def logits_operand(logits, idx, vocab):
    """The first ``vocab`` columns of the live rows of given teacher logits, as the kernels read them.

    A view when every row is live (no copy of an [N, V] input), else a gather of the live rows; any
    strides. Half and float32 logits are read as they are (widened per tile); float64 runs in float32.
    """
    z = logits.detach()[:, :vocab]
    if idx.numel() != z.shape[0]:
        z = z.index_select(0, idx)
    if z.dtype == torch.float64:
        z = z.float()
    return z


class _FusedAtodLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, x: LossInputs, sink: dict):
        from atod_fast.kernels.atod_loss_fused import fused_stats

        hp = x.hp
        n, dev = h_s.shape[0], h_s.device
        idx = x.loss_mask.nonzero().squeeze(1)
        n_live = idx.numel()
        f32 = torch.float32
        if x.normalizer is None:
            denom = torch.tensor(float(max(n_live, 1)), dtype=f32, device=dev)
        else:
            denom = torch.as_tensor(x.normalizer, device=dev).detach().to(f32).reshape(())

        hs, ws, bs = operands(w_s, b_s, h_s.detach().index_select(0, idx), x.vocab)
        ht = wt = bt = ids = phat = None
        if x.teacher_logits is not None:
            ht = logits_operand(x.teacher_logits, idx, x.vocab)  # wt None: the kernels read logits
        elif x.teacher == "dense":
            ht, wt, bt = operands(x.teacher_weight, x.teacher_bias, x.teacher_hidden.detach().index_select(0, idx),
                                   x.vocab)
        tgt = x.target_ids.index_select(0, idx).contiguous()

        def rows(t):  # the live rows of an optional per-row input, in float32
            return None if t is None else t.detach().index_select(0, idx).to(f32)

        old, adv, lam, ref, tlp = (rows(t) for t in (x.old_logprobs, x.advantages, x.lam, x.ref_logprobs,
                                                     x.teacher_logprobs))
        # The kernels see no teacher for a sampled one (its divergence name is then unused by them).
        kernel_teacher, kernel_div = ("none", "reverse_kl") if x.teacher == "sampled" else (x.teacher, hp.divergence)
        if x.teacher == "sparse":
            ids = x.teacher_topk_ids.index_select(0, idx).contiguous()
            lp_hat = torch.log_softmax(x.teacher_topk_logprobs.detach().index_select(0, idx).to(f32), dim=-1)
            pos = lp_hat > -float("inf")  # -inf teacher entries contribute nothing (0·log 0 = 0)
            phat = torch.where(pos, lp_hat.exp(), torch.zeros_like(lp_hat)).contiguous()
            plogp = torch.where(pos, phat * lp_hat, torch.zeros_like(lp_hat)).sum(-1)

        stats = fused_stats(hs, ws, bs, ht, wt, bt, tgt, ids, phat, teacher=kernel_teacher,
                            divergence=kernel_div, jsd_beta=hp.jsd_beta, temperature=hp.temperature)
        m_s, log_ls, ent, logprob = stats[0], stats[1], stats[2], stats[3]
        if x.teacher == "dense":
            distill = stats[4]
            ent_t = stats[8]
        elif x.teacher == "sparse":
            s_hat = phat.sum(-1)
            distill = plogp - stats[4] + s_hat * (m_s + log_ls)
            stats[4] = distill
            stats[5] = s_hat  # the gradient kernel reads Σ p̂ from this row
            ent_t = -plogp
        elif x.teacher == "sampled":
            distill, ent_t = sampled_rows(logprob, old, tlp), -tlp
        else:
            distill = ent_t = torch.zeros_like(ent)
        loss_rows, pg, kl, clipped, c_lp = ppo_rows(
            logprob, old, adv, lam, ref, distill, ent, clip_eps_low=hp.clip_eps_low, clip_eps_high=hp.clip_eps_high,
            dual_clip=hp.dual_clip, kl_coef=hp.kl_coef, entropy_coef=hp.entropy_coef, sampled=x.teacher == "sampled")

        out = torch.zeros(len(OUT_FIELDS), n, dtype=f32, device=dev)
        per_row = torch.stack([loss_rows, logprob, ent, distill, pg, kl, clipped.to(f32), ent_t])
        out.index_copy_(1, idx, per_row)
        for i, name in enumerate(OUT_FIELDS[1:], start=1):
            sink[name] = out[i] > 0.5 if name == "clipped" else out[i]

        ctx.save_for_backward(idx, hs, ws, bs, ht, wt, bt, tgt, ids, phat, stats, c_lp.contiguous(),
                              lam.contiguous(), denom)
        ctx.x = x
        ctx.kernel = dict(teacher=kernel_teacher, divergence=kernel_div)
        ctx.meta = [None if t is None else (t.shape, t.dtype) for t in (h_s, w_s, b_s)]
        return out[0].sum() / denom

    @staticmethod
    def backward(ctx, g):
        from atod_fast.kernels.atod_loss_fused import fused_grad

        idx, hs, ws, bs, ht, wt, bt, tgt, ids, phat, stats, c_lp, lam, denom = ctx.saved_tensors
        x = ctx.x
        hp = x.hp
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = (g.float() / denom / hp.temperature).reshape(1)
        ent_coef = torch.full_like(lam, hp.entropy_coef)
        gh, gw, gb = fused_grad(hs, ws, bs, ht, wt, bt, tgt, ids, phat, stats, c_lp, lam, ent_coef, scale,
                                **ctx.kernel, jsd_beta=hp.jsd_beta,
                                temperature=hp.temperature,
                                need_h=need_h, need_w=need_w, need_b=need_b and bs is not None)
        (h_shape, h_dt), (w_shape, w_dt), b_meta = ctx.meta
        grad_h = grad_w = grad_b = None
        if gh is not None:
            grad_h = torch.zeros(h_shape, dtype=h_dt, device=g.device)
            grad_h.index_copy_(0, idx, gh.to(h_dt))
        if gw is not None:
            grad_w = torch.zeros(w_shape, dtype=w_dt, device=g.device)
            grad_w[: gw.shape[0]] = gw  # g is already inside the kernel's scale
        if gb is not None:
            grad_b = torch.zeros(b_meta[0], dtype=b_meta[1], device=g.device)
            grad_b[: gb.shape[0]] = gb
        return grad_h, grad_w, grad_b, None, None


def atod_loss_fused(x: LossInputs):
    """The ``triton_fused`` backend of ``atod_loss``."""
    sink: dict = {}
    loss = _FusedAtodLoss.apply(x.student_hidden, x.student_weight, x.student_bias, x, sink)
    return loss, sink
