"""Plain-PyTorch ATOD loss: the definition every fused backend is tested against.

It materializes the full [N, V] logits of student and teacher and lets autograd do the
backward, so it is simple and slow. Math runs in float32 whatever the input dtype
(float64 when the inputs are float64, so finite-difference checks are meaningful).
"""

from __future__ import annotations

import torch

from .inputs import Hyper, LossInputs


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def head_logits(hidden, weight, bias, vocab: int, temperature: float, dtype) -> torch.Tensor:
    """(h Wᵀ + b) / T over the first ``vocab`` rows of the head, in ``dtype``. [N, vocab]"""
    z = hidden.to(dtype) @ weight[:vocab].to(dtype).t()
    if bias is not None:
        z = z + bias[:vocab].to(dtype)
    return z / temperature if temperature != 1.0 else z


def divergence_dense(logp_s: torch.Tensor, logp_t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """D(student‖teacher) per row from full log-probabilities. [N, V] x2 -> [N]"""
    p_s = logp_s.exp()
    if divergence == "reverse_kl":
        return (p_s * (logp_s - logp_t)).sum(-1)
    p_t = logp_t.exp()
    if divergence == "forward_kl":
        return (p_t * (logp_t - logp_s)).sum(-1)
    # Generalized JSD with mixture m = (1 − β) p_s + β p_t (TRL's convention).
    logm = torch.logaddexp(logp_s + torch.log1p(torch.tensor(-beta, dtype=logp_s.dtype)),
                           logp_t + torch.log(torch.tensor(beta, dtype=logp_s.dtype)))
    kl_t = (p_t * (logp_t - logm)).sum(-1)
    kl_s = (p_s * (logp_s - logm)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def divergence_sparse(logp_s: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL over the teacher's top-k ids, teacher probabilities renormalized. -> [N]"""
    logp_hat = torch.log_softmax(topk_logprobs.to(logp_s.dtype), dim=-1)
    p_hat = logp_hat.exp()
    logp_s_k = logp_s.gather(1, topk_ids)
    # Ids padded with -inf teacher log-probs contribute nothing (0·log 0 = 0).
    term = torch.where(p_hat > 0, p_hat * (logp_hat - logp_s_k), torch.zeros_like(p_hat))
    return term.sum(-1)


def sampled_reverse_kl(logprob, old, teacher_logprobs):
    """D = −(t − o)·e^(lp − o): a PPO surrogate with advantage t − o and no clip, so dD/d lp = D.
    At o = lp its value is lp − t, a one-sample estimate of KL(p_s‖p_t) at the sampled token. -> [N]"""
    return -(teacher_logprobs - old) * torch.exp(logprob - old)


def ppo_terms(logprob, old, adv, ref, hp: Hyper):
    """Clipped surrogate, clipped flag and k3 KL per row. -> (pg, clipped, kl), each [N]"""
    ratio = torch.exp(logprob - old)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - hp.clip_eps_low, 1.0 + hp.clip_eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    if hp.dual_clip is not None:
        bound = -hp.dual_clip * adv
        dual = (adv < 0) & (bound < pg)
        pg = torch.where(dual, bound, pg)
        clipped = clipped | dual
    if ref is None:
        kl = torch.zeros_like(logprob)
    else:
        delta = ref - logprob
        kl = torch.exp(delta) - delta - 1.0
    return pg, clipped, kl


def atod_loss_reference(x: LossInputs):
    """The reference backend of ``atod_loss``; returns (loss, per-token outputs dict)."""
    hp = x.hp
    dt = compute_dtype(x.student_hidden)
    mask = x.loss_mask
    zero = torch.zeros((), dtype=dt, device=x.student_hidden.device)

    # Masked rows may hold padding garbage (-100 targets, NaN advantages): neutralize them
    # so nothing non-finite can leak into the loss or its gradient.
    def live(t):
        m = mask.view(-1, *([1] * (t.dim() - 1)))
        return torch.where(m, t.detach().to(dt), zero)

    target = torch.where(mask, x.target_ids, torch.zeros_like(x.target_ids))
    lam = live(x.lam)
    ref = None if x.ref_logprobs is None else live(x.ref_logprobs)

    z_s = head_logits(x.student_hidden, x.student_weight, x.student_bias, x.vocab, hp.temperature, dt)
    logp_s = torch.log_softmax(z_s, dim=-1)
    logprob = logp_s.gather(1, target[:, None]).squeeze(1)
    entropy = -(logp_s.exp() * logp_s).sum(-1)
    # No old log-probs: the current ones, detached (ratio 1, gradient of the ratio still d lp).
    old = logprob.detach() if x.old_logprobs is None else live(x.old_logprobs)
    adv = torch.zeros_like(lam) if x.advantages is None else live(x.advantages)  # −0·r: pg 0, never clipped

    if x.teacher == "dense":
        with torch.no_grad():
            if x.teacher_logits is not None:
                z_t = x.teacher_logits.detach()[:, : x.vocab].to(dt)
                z_t = z_t / hp.temperature if hp.temperature != 1.0 else z_t
            else:
                z_t = head_logits(x.teacher_hidden.detach(), x.teacher_weight.detach(),
                                  None if x.teacher_bias is None else x.teacher_bias.detach(),
                                  x.vocab, hp.temperature, dt)
            z_t = torch.where(mask[:, None], z_t, zero)  # padding rows of given logits may hold anything
            logp_t = torch.log_softmax(z_t, dim=-1)
            teacher_entropy = -(logp_t.exp() * logp_t).sum(-1)
        distill = divergence_dense(logp_s, logp_t, hp.divergence, hp.jsd_beta)
    elif x.teacher == "sparse":
        ids = torch.where(mask[:, None], x.teacher_topk_ids, torch.zeros_like(x.teacher_topk_ids))
        distill = divergence_sparse(logp_s, ids, live(x.teacher_topk_logprobs))
        logp_hat = torch.log_softmax(live(x.teacher_topk_logprobs), dim=-1)
        p_hat = logp_hat.exp()
        teacher_entropy = -torch.where(p_hat > 0, p_hat * logp_hat, torch.zeros_like(p_hat)).sum(-1)
    elif x.teacher == "sampled":
        t = live(x.teacher_logprobs)
        distill = sampled_reverse_kl(logprob, old, t)
        teacher_entropy = -t
    else:
        distill = torch.zeros_like(logprob)
        teacher_entropy = torch.zeros_like(logprob)

    pg, clipped, kl = ppo_terms(logprob, old, adv, ref, hp)
    per_token = lam * distill + (1.0 - lam) * (pg + hp.kl_coef * kl) - hp.entropy_coef * entropy
    per_token = torch.where(mask, per_token, zero)

    if x.normalizer is None:
        denom = mask.sum().clamp(min=1).to(dt)
    else:
        denom = torch.as_tensor(x.normalizer, dtype=dt, device=per_token.device).detach()
    loss = per_token.sum() / denom

    out_dt = torch.float64 if dt == torch.float64 else torch.float32

    def report(t):
        return torch.where(mask, t.detach(), zero).to(out_dt)

    outputs = dict(
        logprobs=report(logprob), entropy=report(entropy), distill=report(distill),
        pg=report(pg), kl=report(kl), clipped=clipped.detach() & mask, teacher_entropy=report(teacher_entropy),
    )
    return loss.to(out_dt), outputs
