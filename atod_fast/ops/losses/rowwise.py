"""The per-chunk row math of the chunked ATOD loss in plain PyTorch.

Same contract as ``atod_fast.kernels.atod_loss.atod_rows`` (the Triton kernel): given a
chunk of raw logits, return the per-row terms and overwrite the student logits with
d(loss)/d(logits). Being plain PyTorch it runs anywhere, in float32 or float64, and the
chunking code above it is shared with the Triton backend, so a bug there shows on both.
"""

from __future__ import annotations

import math

import torch

# Full-width [R, V] buffers alive at once below (zs, zt, log p_s, p_s, log p_t, p_t, log m).
TORCH_ROW_BUFFERS = 7


def sampled_rows(logprob, old, teacher_logprobs):
    """The sampled teacher's D = −(t − o)·e^(lp − o) per row (``old`` None: o = lp). Its slope in lp is D
    itself (a PPO surrogate with advantage t − o, no clip), so ``ppo_rows(sampled=True)`` adds λ·D to c_lp."""
    if old is None:
        return logprob - teacher_logprobs
    return -(teacher_logprobs - old) * torch.exp(logprob - old)


def ppo_rows(logprob, old, adv, lam, ref, distill, ent, *, clip_eps_low, clip_eps_high, dual_clip,
             kl_coef, entropy_coef, sampled=False):
    """Clipped PPO, k3 KL and the λ mix per row; also c_lp = dℓ/d logprob. -> (loss, pg, kl, clipped, c_lp)

    ``old`` None: the current log-probs (ratio 1). ``adv`` None: no PPO term (pg = −0·r = 0, never
    clipped). ``sampled``: ``distill`` is the sampled teacher's D (``sampled_rows``), which depends on lp.
    """
    if old is None:
        old = logprob
    if adv is None:
        adv = torch.zeros_like(logprob)
    ratio = torch.exp(logprob - old)
    pg_un = -adv * ratio
    pg_cl = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = torch.maximum(pg_un, pg_cl)
    clipped = pg_cl > pg_un
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual = (adv < 0) & (bound < pg)
        pg = torch.where(dual, bound, pg)
        clipped = clipped | dual
    # A clip that sets the value has zero slope; the unclipped branch has slope −A·r.
    g_pg = torch.where(clipped, torch.zeros_like(pg_un), pg_un)
    if ref is None:
        kl = torch.zeros_like(logprob)
        g_kl = torch.zeros_like(logprob)
    else:
        delta = ref - logprob
        e_delta = torch.exp(delta)
        kl = e_delta - delta - 1.0
        g_kl = 1.0 - e_delta
    c_lp = (1.0 - lam) * (g_pg + kl_coef * g_kl)
    if sampled:
        c_lp = c_lp + lam * distill
    loss = lam * distill + (1.0 - lam) * (pg + kl_coef * kl) - entropy_coef * ent
    return loss, pg, kl, clipped, c_lp


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij without an [R, V] temporary. [R, V] x2 -> [R]"""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def torch_rows(zs, zt, tgt, old, adv, lam, ref, sparse_sums, scale, *, teacher, divergence, jsd_beta, temperature,
               clip_eps_low, clip_eps_high, dual_clip, kl_coef, entropy_coef, write_grad, teacher_logprobs=None):
    """Per-row ATOD terms of a chunk; with ``write_grad`` overwrite ``zs`` with d(loss)/d(zs).

    zs, zt ``[R, V]`` raw logits (both owned by the caller's chunk loop: they are overwritten);
    per-row inputs ``[R]`` (old None: the rows' own log-probs; adv None: no PPO term);
    sparse_sums ``[R, 3]`` holding (Σ p̂ log p̂, Σ p̂ z_s[id], Σ p̂); teacher_logprobs ``[R]``
    (sampled teacher); scale ``[1]`` = 1 / (normalizer · T). -> ``[8, R]`` in the order of ``OUT_FIELDS``

    The gradient is assembled in place in the buffers that are no longer needed: on the CPU
    every fresh [R, V] allocation costs page faults, not just bandwidth.
    """
    inv_t = 1.0 / temperature
    lps = torch.log_softmax(zs * inv_t if temperature != 1.0 else zs, dim=-1)
    p = lps.exp()
    ent = -rowdot(p, lps)
    logprob = lps.gather(1, tgt[:, None]).squeeze(1)
    gap = pt = kl_sm = None
    if teacher == "dense":
        # Differences are formed elementwise before any sum (Σ p·log p − Σ p·log q cancels badly).
        lpt = torch.log_softmax(zt * inv_t if temperature != 1.0 else zt, dim=-1)
        pt = torch.exp(lpt, out=zt)  # the raw teacher logits are no longer needed
        ent_t = -rowdot(pt, lpt)
        if divergence == "reverse_kl":
            gap = lpt.neg_().add_(lps)  # log p − log q, in lpt's buffer
            distill = rowdot(p, gap)
        elif divergence == "forward_kl":
            distill = rowdot(pt, lpt.sub_(lps))
        else:
            logm = torch.logaddexp(lps + math.log1p(-jsd_beta), lpt + math.log(jsd_beta))
            kl_tm = rowdot(pt, lpt.sub_(logm))
            gap = logm.neg_().add_(lps)  # log p − log m, in logm's buffer
            kl_sm = rowdot(p, gap)
            distill = jsd_beta * kl_tm + (1.0 - jsd_beta) * kl_sm
    elif teacher == "sparse":
        lse_s = zs[:, 0] * inv_t - lps[:, 0]
        distill = sparse_sums[:, 0] - sparse_sums[:, 1] + sparse_sums[:, 2] * lse_s
        ent_t = -sparse_sums[:, 0]
    elif teacher == "sampled":
        distill = sampled_rows(logprob, old, teacher_logprobs)
        ent_t = -teacher_logprobs
    else:
        distill = torch.zeros_like(ent)
        ent_t = torch.zeros_like(ent)

    loss, pg, kl, clipped, c_lp = ppo_rows(
        logprob, old, adv, lam, ref, distill, ent, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef, sampled=teacher == "sampled")
    out = torch.stack([loss, logprob, ent, distill, pg, kl, clipped.to(loss.dtype), ent_t.to(loss.dtype)])
    if not write_grad:
        return out

    # dz = p·(c_ent·(log p + H) − c_lp) + c_lp·[target] + λ·dD/dz, written into zs.
    dz = torch.add(lps, ent[:, None], out=zs).mul_(entropy_coef).sub_(c_lp[:, None]).mul_(p)
    col = lam[:, None]
    if teacher == "dense":
        if divergence == "reverse_kl":  # p (log p − log q − D)
            dz.add_(gap.sub_(distill[:, None]).mul_(p).mul_(col))
        elif divergence == "forward_kl":  # p − q
            dz.add_(pt.neg_().add_(p).mul_(col))
        else:  # (1 − β) p (log p − log m − KL(p‖m))
            dz.add_(gap.sub_(kl_sm[:, None]).mul_(p).mul_(col * (1.0 - jsd_beta)))
    elif teacher == "sparse":
        dz.addcmul_(p, (lam * sparse_sums[:, 2])[:, None])
    dz.scatter_add_(1, tgt[:, None], c_lp[:, None])
    dz.mul_(scale.to(dz.dtype))
    return out
