"""``atod_loss``: the one public entry point of the ATOD objective, whatever the backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton import check_triton_backend, triton_available
from .chunked import atod_loss_chunked
from .fused import atod_loss_fused
from .inputs import validate
from .reference import atod_loss_reference

# name -> implementation taking validated LossInputs and returning (loss, per-token dict)
_IMPLS = {
    "reference": atod_loss_reference,
    "torch": lambda x: atod_loss_chunked(x, "torch"),
    "triton": lambda x: atod_loss_chunked(x, "triton"),
    "triton_fused": atod_loss_fused,
}
BACKENDS = ("auto", *_IMPLS)


@dataclass(frozen=True)
class AtodLossOutput:
    """Result of :func:`atod_loss`.

    ``loss`` is a 0-dim float32 tensor, differentiable w.r.t. the student's hidden states,
    head weight and bias. Every other field is a detached ``[N]`` tensor (float32, or bool
    for ``clipped``); rows with ``loss_mask`` False hold 0 / False.
    """

    loss: torch.Tensor
    """Σ mask·ℓ / normalizer."""
    logprobs: torch.Tensor
    """log p_s(target) under the current student (the PPO numerator)."""
    entropy: torch.Tensor
    """−Σ p_s log p_s of the student."""
    distill: torch.Tensor
    """D(student‖teacher) of the chosen divergence (0 without a teacher)."""
    pg: torch.Tensor
    """Clipped PPO surrogate (to be minimized)."""
    kl: torch.Tensor
    """k3 estimate of KL(student‖reference) (0 without ``ref_logprobs``)."""
    clipped: torch.Tensor
    """True where a clipping branch (ratio clip or dual clip) set the surrogate."""
    teacher_entropy: torch.Tensor
    """Entropy of the teacher at the loss temperature: −Σ p_t log p_t (dense), −Σ p̂ log p̂ over the
    renormalized top-k (sparse), the surprisal −teacher_logprobs of the sampled token (sampled: a
    one-sample stand-in), 0 without a teacher."""


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend.startswith("triton"):
        check_triton_backend(backend, device)
    return backend


def atod_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target_ids: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    divergence: str = "reverse_kl", jsd_beta: float = 0.5, temperature: float = 1.0,
    clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
    kl_coef: float = 0.0, entropy_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None, backend: str = "auto", chunk_size: int | None = None,
) -> AtodLossOutput:
    """The ATOD loss: λ-mixed distillation and PPO, per token, from hidden states.

    Per row i (row i of the hidden states predicts ``target_ids[i]``; callers shift)::

        ℓ_i = lam_i·D_i + (1 − lam_i)·(pg_i + kl_coef·kl_i) − entropy_coef·entropy_i
        loss = Σ_i mask_i·ℓ_i / (Σ_i mask_i  if normalizer is None else normalizer)

    Distillation alone (TRL's GKD): ``atod_loss(h, W, targets, loss_mask=mask, teacher_logits=zt,
    divergence="jsd", jsd_beta=beta)``; without advantages there is no PPO term and λ is 1.

    Args:
        student_hidden: ``[N, H]`` student last hidden states.
        student_weight: ``[V, H]`` student LM-head weight.
        target_ids: ``[N]`` int64 sampled token ids.
        old_logprobs: ``[N]`` behaviour-policy log-probs of ``target_ids``; None: the current ones,
            detached (ratio 1, as in a single on-policy update).
        advantages: ``[N]`` advantages (e.g. from ``compute_gae``); None: no PPO term (pg 0, never clipped).
        lam: ``[N]`` per-token λ in [0, 1] (e.g. from ``AnnealSchedule``); may be None only without
            advantages, and then is 1.
        loss_mask: ``[N]`` bool, or integer 0/1, true on tokens that count; None: every row counts.
        student_bias: ``[V]`` optional head bias.
        teacher_hidden, teacher_weight, teacher_bias: dense teacher, ``[N, Ht]``, ``[Vt, Ht]``, ``[Vt]``.
        teacher_topk_ids, teacher_topk_logprobs: sparse teacher, ``[N, K]`` each (forward_kl only).
        teacher_logits: ``[N, V']`` dense teacher given as raw logits (V' >= the vocabulary in use; its
            first columns are used), divided by ``temperature`` like computed ones.
        teacher_logprobs: ``[N]`` sampled teacher: log p_t(target_ids[i]) at the loss temperature
            (``divergence="sampled_reverse_kl"`` only).
        ref_logprobs: ``[N]`` reference-policy log-probs for the k3 KL penalty.
        divergence: ``"reverse_kl"``, ``"forward_kl"``, ``"jsd"`` or ``"sampled_reverse_kl"``
            (D_i = −(t_i − o_i)·e^(lp_i − o_i) from the sampled token alone; see docs/method.md).
        jsd_beta: β in [0, 1] of the generalized JSD; 0 is forward_kl and 1 reverse_kl exactly.
        temperature: logits of both models are divided by it.
        clip_eps_low, clip_eps_high: ratio clip range [1 − ε_low, 1 + ε_high].
        dual_clip: c > 1 bounds the surrogate by −c·A for negative advantages.
        kl_coef, entropy_coef: weights of the k3 KL and of the entropy bonus.
        normalizer: divide the masked sum by this instead of the number of masked rows.
        vocab_size: use the first n rows of both heads (heads padded to different sizes).
        backend: ``"auto"`` (``"triton"`` on CUDA, ``"torch"`` otherwise), ``"reference"`` (full logits,
            autograd; the test oracle), ``"torch"`` (chunked, plain PyTorch), ``"triton"`` (chunked, one
            Triton kernel per chunk) or ``"triton_fused"`` (logits never leave registers).
        chunk_size: rows per chunk for chunked backends (chosen automatically if None).

    Returns:
        :class:`AtodLossOutput`.
    """
    x = validate(
        student_hidden, student_weight, target_ids, old_logprobs, advantages, lam, loss_mask,
        student_bias=student_bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_logits=teacher_logits, teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs,
        divergence=divergence, jsd_beta=jsd_beta, temperature=temperature,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
        entropy_coef=entropy_coef, normalizer=normalizer, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    which = _resolve_backend(backend, x.student_hidden.device)
    loss, out = _IMPLS[which](x)
    return AtodLossOutput(loss=loss, **out)
