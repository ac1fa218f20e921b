"""The per-chunk row math of the ``torch`` backend, written for ``torch.compile`` on the CPU.

Same contract as :func:`rowwise.torch_rows` (per-row terms out, d(loss)/d(logits) written over
``zs``). Eager PyTorch pays for every elementwise op with a pass over a [R, V] buffer and, on the
CPU, a page fault per fresh 4 KiB of temporaries; compiled by Inductor, the whole function becomes
a handful of vectorized loops per row (max, Σ exp, the divergence sums, the gradient) with no
[R, V] temporaries, and the caller feeds it a few rows at a time so each row's passes hit the cache;
OpenMP inside the compiled loops splits those rows over torch's threads.

Numerics against ``torch_rows``: p is ``exp(z − max) / Σ``, not ``exp(log_softmax)``; the JSD
mixture is ``log((1 − β)p + βq)`` floored at the smallest normal float instead of ``logaddexp``
of the log-probabilities (where both p and q underflow the floor, both weigh 0 in every sum).
Float32 only; the eager function remains the path for float64 and the fallback.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .rowwise import ppo_rows, sampled_rows

SUB_ROWS = int(os.environ.get("ATOD_FAST_SUB_ROWS", "8"))
"""Rows per compiled call: a few rows of student and teacher logits (128 KiB each at V = 32k) stay
in L2 across the 4–6 vocabulary passes of the compiled loops."""
COMPILED_ROW_BUFFERS = 2
"""[C, V] buffers per chunk row on this path: the student's and teacher's logits (p and E go over them)."""
MIN_ELEMENTS = 1 << 21
"""Below this many live logits per call the eager function wins (compilation costs seconds once)."""
_log = logging.getLogger(__name__)


def _softmax_parts(z):
    """p, log p of the rows of z. [R, V] -> ([R, V], [R, V], [R, 1] log-sum-exp)"""
    # p is exp(z − lse), not exp(z − max)/Σ: Inductor then recomputes it in each loop instead of
    # realizing a [R, V] temporary (on the CPU every fresh one costs page faults).
    mx = z.amax(-1, keepdim=True)
    lse = mx + torch.log(torch.exp(z - mx).sum(-1, keepdim=True))
    lp = z - lse
    return torch.exp(lp), lp, lse


def _divergence(p, lps, lse_s, zt, lam, sp, *, teacher, divergence, jsd_beta, inv_t, entropy_coef):
    """D per row, and the gradient split as dz = p·a + E + c_lp·[target] (None: E = p·c_ent·log p only).
    -> (distill [R], a_div [R] (λ·dD/dz's per-row part), E [R, V] or None, teacher entropy [R])
    A sampled teacher's D is formed by the caller (it needs the log-probs of the targets)."""
    col = lam[:, None]
    c_ent = entropy_coef * lps
    if teacher == "dense":
        q, lpt, _ = _softmax_parts(zt * inv_t if inv_t != 1.0 else zt)
        ent_t = -(q * lpt).sum(-1)
        if divergence == "reverse_kl":  # λ p (log p − log q − D)
            gap = lps - lpt
            distill = (p * gap).sum(-1)
            return distill, -lam * distill, p * (c_ent + col * gap), ent_t
        if divergence == "forward_kl":  # λ (p − q)
            distill = (q * (lpt - lps)).sum(-1)
            return distill, lam, p * c_ent - col * q, ent_t
        # JSD: λ (1 − β) p (log p − log m − KL(p‖m)); both p and q below the floor weigh 0 in every sum.
        logm = torch.log(((1.0 - jsd_beta) * p + jsd_beta * q).clamp_min(torch.finfo(p.dtype).tiny))
        kl_tm = (q * (lpt - logm)).sum(-1)
        gap = lps - logm
        kl_sm = (p * gap).sum(-1)
        w = lam * (1.0 - jsd_beta)
        return jsd_beta * kl_tm + (1.0 - jsd_beta) * kl_sm, -w * kl_sm, p * (c_ent + w[:, None] * gap), ent_t
    if teacher == "sparse":  # λ Σp̂ p − λ p̂ at the ids (the host scatters the second part)
        distill = sp[:, 0] - sp[:, 1] + sp[:, 2] * lse_s.squeeze(1)
        return distill, lam * sp[:, 2], p * c_ent, -sp[:, 0]
    zero = torch.zeros_like(lse_s.squeeze(1))
    return zero, torch.zeros_like(lam), p * c_ent, zero


def _stage_a(zs, zt, tgt, old, adv, lam, ref, sp, tlp, *, teacher, divergence, jsd_beta, temperature,
             clip_eps_low, clip_eps_high, dual_clip, kl_coef, entropy_coef, write_grad):
    """Every per-row term; with ``write_grad`` p goes over ``zs`` and E over ``zt`` (or a new buffer).
    -> ([8, R] rows, [R] a: dz = p·a + E + c_lp·[target], [R] c_lp, E or None)"""
    inv_t = 1.0 / temperature
    z = zs * inv_t if temperature != 1.0 else zs
    p, lps, lse_s = _softmax_parts(z)
    ent = -(p * lps).sum(-1)
    logprob = lps.gather(1, tgt[:, None]).squeeze(1)
    distill, a_div, e, ent_t = _divergence(p, lps, lse_s, zt, lam, sp, teacher=teacher, divergence=divergence,
                                           jsd_beta=jsd_beta, inv_t=inv_t, entropy_coef=entropy_coef)
    if teacher == "sampled":  # its slope goes through the log-prob: c_lp, not a_div
        distill, ent_t = sampled_rows(logprob, old, tlp), -tlp
    loss, pg, kl, clipped, c_lp = ppo_rows(
        logprob, old, adv, lam, ref, distill, ent, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef, sampled=teacher == "sampled")
    out = torch.stack([loss, logprob, ent, distill, pg, kl, clipped.to(loss.dtype), ent_t.to(loss.dtype)])
    if not write_grad:
        return out, None, None, None
    # Materialized once here, so the gradient pass below is arithmetic only (no exp or log again).
    zs.copy_(p)
    if zt is not None:
        zt.copy_(e)
        e = None
    elif entropy_coef == 0.0:
        e = None
    return out, entropy_coef * ent - c_lp + a_div, c_lp, e


def _stage_b(zs, e, tgt, a, c_lp, scale):
    """dz = (p·a + E + c_lp·[target]) · scale over ``zs`` (which holds p)."""
    onehot = torch.arange(zs.shape[1], device=zs.device)[None, :] == tgt[:, None]
    dz = zs * a[:, None] + torch.where(onehot, c_lp[:, None], 0.0)
    if e is not None:
        dz = dz + e
    zs.copy_(dz * scale)


def _rows_math(zs, zt, tgt, old, adv, lam, ref, sp, tlp, scale, **hp):
    """One sub-block: the two compiled stages (E lives in zt's buffer when there is one)."""
    stage_a, stage_b = _compiled(torch.get_num_threads())
    out, a, c_lp, e = stage_a(zs, zt, tgt, old, adv, lam, ref, sp, tlp, **hp)
    if hp["write_grad"]:
        stage_b(zs, zt if zt is not None else e, tgt, a, c_lp, scale)
    return out


@functools.cache
def _compiled(threads: int):
    # Inductor's own OpenMP loops split each sub-block's rows over the threads. (Python threads would not: the
    # compiled kernels' bindings hold the GIL, so a pool of them runs one kernel at a time.)
    opts = dict(dynamic=True, options={"cpp.threads": threads})
    return torch.compile(_stage_a, **opts), torch.compile(_stage_b, **opts)


def compile_enabled() -> bool:
    """``ATOD_FAST_COMPILE=0`` turns the compiled path off (e.g. where no C++ compiler is installed)."""
    return os.environ.get("ATOD_FAST_COMPILE", "1") != "0"


_failed: set = set()


def row_slice(t, i, j):
    """Rows i:j of an optional per-row tensor."""
    return None if t is None else t[i:j]


def compiled_rows(zs, zt, tgt, old, adv, lam, ref, sparse_sums, scale, *, teacher_logprobs=None, **hp):
    """``torch_rows``' contract through the compiled function, ``SUB_ROWS`` rows per call.

    Returns None when compilation is unavailable or failed for this configuration (the caller then runs the
    eager function); a failure is logged once.
    """
    key = (*sorted(hp.items()), *(t is None for t in (zt, old, adv, ref, sparse_sums, teacher_logprobs)))
    if key in _failed:
        return None
    outs = []
    for i in range(0, zs.shape[0], SUB_ROWS):
        j = i + SUB_ROWS
        rows = (row_slice(t, i, j) for t in (zs, zt, tgt, old, adv, lam, ref, sparse_sums, teacher_logprobs))
        try:
            outs.append(_rows_math(*rows, scale, **hp))
        except Exception as e:  # any compiler failure falls back to eager: correct, slower
            if i:
                raise  # compiled once already: not a compiler failure
            _failed.add(key)
            _log.warning("torch.compile of the loss rows failed (%s: %s); using eager PyTorch",
                         type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None
    return torch.cat(outs, dim=1)


def use_compiled(device: torch.device, dtype: torch.dtype, elements: int) -> bool:
    """Whether the rows go through the compiled function: float32 on the CPU, large enough to pay."""
    return device.type == "cpu" and dtype == torch.float32 and elements >= MIN_ELEMENTS and compile_enabled()
