"""Argument checking for ``atod_loss``, shared by every backend.

Every backend receives the same validated :class:`LossInputs`, so a bad argument gets the
same error whichever implementation would have run. Checks that look at values (target
ids in range, λ in [0, 1]) only look at rows with ``loss_mask`` True: padded rows commonly
carry an ignore index such as -100, and masked rows never reach the loss.

Normalization done here, once, so no backend repeats it: ``lam`` None becomes ones, ``loss_mask``
None all True and an integer mask bool; ``divergence="jsd"`` with ``jsd_beta`` 0 or 1 becomes
``forward_kl`` or ``reverse_kl`` (the limits of the generalized JSD, as TRL and Liger define them).
``old_logprobs`` and ``advantages`` stay None when absent: every backend reads None as "the
current log-probs" and "no PPO term".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled_reverse_kl")


@dataclass(frozen=True)
class Hyper:
    """Scalar hyperparameters of the loss, validated."""

    divergence: str
    jsd_beta: float
    temperature: float
    clip_eps_low: float
    clip_eps_high: float
    dual_clip: float | None
    kl_coef: float
    entropy_coef: float


@dataclass
class LossInputs:
    """Validated inputs of one ``atod_loss`` call.

    ``vocab`` is the number of head rows in use (``vocab_size`` or the common V). The
    teacher is ``"dense"`` (hidden + weight, or ``teacher_logits``), ``"sparse"`` (top-k ids +
    log-probs), ``"sampled"`` (``teacher_logprobs`` of the targets) or ``"none"``.
    """

    student_hidden: torch.Tensor      # [N, H]
    student_weight: torch.Tensor      # [V, H]
    student_bias: torch.Tensor | None  # [V]
    target_ids: torch.Tensor          # [N] int64
    old_logprobs: torch.Tensor | None  # [N]; None: the current log-probs, detached (ratio 1)
    advantages: torch.Tensor | None   # [N]; None: no PPO term (pg = 0, never clipped)
    lam: torch.Tensor                 # [N]
    loss_mask: torch.Tensor           # [N] bool
    teacher: str
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logprobs: torch.Tensor | None
    teacher_logits: torch.Tensor | None    # [N, V'], V' >= vocab; a dense teacher's raw logits
    teacher_logprobs: torch.Tensor | None  # [N]; the sampled teacher's log p_t(target)
    ref_logprobs: torch.Tensor | None
    normalizer: float | torch.Tensor | None
    vocab: int
    hp: Hyper
    chunk_size: int | None

    @property
    def n(self) -> int:
        return self.student_hidden.shape[0]


def _tensor(name, x, ndim, *, floating=None, dtype=None):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def _rows(name, x, n):
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows but student_hidden has N={n}; every per-token input needs N")


def _number(name, v, *, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        lb = "(" if lo_open else "["
        hb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}{hb}, got {v}")
    return v


def validate(
    student_hidden, student_weight, target_ids, old_logprobs, advantages, lam, loss_mask, *,
    student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_topk_ids, teacher_topk_logprobs,
    teacher_logits=None, teacher_logprobs=None, ref_logprobs, divergence, jsd_beta, temperature, clip_eps_low,
    clip_eps_high, dual_clip, kl_coef, entropy_coef, normalizer, vocab_size, chunk_size,
) -> LossInputs:
    """Check every argument of ``atod_loss`` and return them normalized."""
    h, w, v_student = _check_student(student_hidden, student_weight, student_bias)
    n = h.shape[0]
    target_ids, lam, loss_mask = _check_rows(n, h.device, target_ids, old_logprobs, advantages, lam, loss_mask,
                                             ref_logprobs)
    hp = _check_hyper(divergence=divergence, jsd_beta=jsd_beta, temperature=temperature, clip_eps_low=clip_eps_low,
                      clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef)
    _check_chunk_size(chunk_size)
    normalizer = _check_normalizer(normalizer)
    teacher, v_teacher = _check_teacher(n, hp.divergence, teacher_hidden, teacher_weight, teacher_bias,
                                        teacher_topk_ids, teacher_topk_logprobs, teacher_logits, teacher_logprobs)
    vocab = _resolve_vocab(vocab_size, v_student, v_teacher, teacher_logits is not None)
    _check_live_values(n, loss_mask, target_ids, lam, teacher_topk_ids if teacher == "sparse" else None, vocab)
    return LossInputs(
        student_hidden=h, student_weight=w, student_bias=student_bias, target_ids=target_ids.long(),
        old_logprobs=old_logprobs, advantages=advantages, lam=lam, loss_mask=loss_mask,
        teacher=teacher, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        teacher_topk_ids=None if teacher_topk_ids is None else teacher_topk_ids.long(),
        teacher_topk_logprobs=teacher_topk_logprobs, teacher_logits=teacher_logits,
        teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs, normalizer=normalizer,
        vocab=vocab, hp=hp, chunk_size=chunk_size,
    )


def _check_student(student_hidden, student_weight, student_bias):
    h = _tensor("student_hidden", student_hidden, 2, floating=True)
    w = _tensor("student_weight", student_weight, 2, floating=True)
    hdim = h.shape[1]
    if w.shape[1] != hdim:
        raise ValueError(f"student_weight has H={w.shape[1]} columns but student_hidden has H={hdim}")
    if w.device != h.device:
        raise ValueError(f"student_weight is on {w.device} but student_hidden is on {h.device}")
    v_student = w.shape[0]
    if student_bias is not None:
        _tensor("student_bias", student_bias, 1, floating=True)
        if student_bias.shape[0] != v_student:
            raise ValueError(f"student_bias has {student_bias.shape[0]} entries, student_weight has V={v_student}")
    return h, w, v_student


def _check_rows(n, device, target_ids, old_logprobs, advantages, lam, loss_mask, ref_logprobs):
    """The per-row inputs: one entry per row of student_hidden. -> (target_ids, lam, bool loss_mask)"""
    target_ids = _tensor("target_ids", target_ids, 1)
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids must be an integer tensor (int64), got dtype {target_ids.dtype}")
    _rows("target_ids", target_ids, n)
    if lam is None and advantages is not None:
        raise ValueError("lam is required when advantages are given (it weighs distillation against PPO); "
                         "it may be None only without advantages, where it defaults to 1 (distillation alone)")
    for name, x in (("old_logprobs", old_logprobs), ("advantages", advantages), ("lam", lam),
                    ("ref_logprobs", ref_logprobs)):
        if x is not None:
            _tensor(name, x, 1, floating=True)
            _rows(name, x, n)
    if lam is None:
        lam = torch.ones(n, dtype=torch.float32, device=device)
    return target_ids, lam, _check_loss_mask(n, device, loss_mask)


def _check_loss_mask(n, device, loss_mask) -> torch.Tensor:
    """bool [N]: None counts every row; an integer mask (TRL's attention-style 0/1) must hold only 0 and 1."""
    if loss_mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    loss_mask = _tensor("loss_mask", loss_mask, 1)
    if loss_mask.dtype.is_floating_point or loss_mask.dtype.is_complex:
        raise ValueError(f"loss_mask must be a bool or integer (0/1) tensor, got dtype {loss_mask.dtype}")
    _rows("loss_mask", loss_mask, n)
    if loss_mask.dtype != torch.bool:
        bad = (loss_mask != 0) & (loss_mask != 1)
        if bool(bad.any()):
            raise ValueError(f"an integer loss_mask must hold only 0 and 1, found {int(loss_mask[bad][0])}")
        loss_mask = loss_mask != 0
    return loss_mask


def _check_hyper(*, divergence, jsd_beta, temperature, clip_eps_low, clip_eps_high, dual_clip, kl_coef,
                 entropy_coef) -> Hyper:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")
    jsd_beta = _number("jsd_beta", jsd_beta, lo=0.0, hi=1.0)
    if divergence == "jsd" and jsd_beta in (0.0, 1.0):
        # The limits of the generalized JSD (TRL, Liger): β = 0 is KL(p_t‖p_s), β = 1 is KL(p_s‖p_t).
        divergence = "forward_kl" if jsd_beta == 0.0 else "reverse_kl"
    temperature = _number("temperature", temperature, lo=0.0, lo_open=True)
    clip_eps_low = _number("clip_eps_low", clip_eps_low, lo=0.0, hi=1.0)
    clip_eps_high = _number("clip_eps_high", clip_eps_high, lo=0.0)
    if dual_clip is not None:
        dual_clip = _number("dual_clip", dual_clip, lo=1.0, lo_open=True)
    kl_coef = _number("kl_coef", kl_coef, lo=0.0)
    entropy_coef = _number("entropy_coef", entropy_coef)
    return Hyper(divergence=divergence, jsd_beta=jsd_beta, temperature=temperature, clip_eps_low=clip_eps_low,
                 clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef, entropy_coef=entropy_coef)


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_normalizer(normalizer):
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        if not bool(normalizer.detach() > 0):
            raise ValueError(f"normalizer must be > 0, got {normalizer.item()}")
        return normalizer
    return _number("normalizer", normalizer, lo=0.0, lo_open=True)


TEACHER_INPUTS = {
    "dense": "teacher_hidden/teacher_weight/teacher_bias",
    "logits": "teacher_logits",
    "sparse": "teacher_topk_ids/teacher_topk_logprobs",
    "sampled": "teacher_logprobs",
}


def _check_teacher(n, divergence, teacher_hidden, teacher_weight, teacher_bias, teacher_topk_ids,
                   teacher_topk_logprobs, teacher_logits, teacher_logprobs) -> tuple[str, int | None]:
    """``(kind, Vt)``: kind "dense", "sparse", "sampled" or "none"; Vt the dense teacher's vocabulary
    (head rows, or teacher_logits columns)."""
    given = [k for k, on in (
        ("dense", teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None),
        ("logits", teacher_logits is not None),
        ("sparse", teacher_topk_ids is not None or teacher_topk_logprobs is not None),
        ("sampled", teacher_logprobs is not None)) if on]
    if len(given) > 1:
        raise ValueError("pass one teacher only, got " + " and ".join(TEACHER_INPUTS[k] for k in given))
    kind = given[0] if given else "none"
    if divergence == "sampled_reverse_kl" and kind != "sampled":
        raise ValueError("divergence='sampled_reverse_kl' needs teacher_logprobs [N] (the teacher's log-prob of "
                         "each target id) and no other teacher input"
                         + (f", got {TEACHER_INPUTS[kind]}" if kind != "none" else ""))
    if kind == "sampled" and divergence != "sampled_reverse_kl":
        raise ValueError(f"teacher_logprobs is the input of divergence='sampled_reverse_kl' only, got {divergence!r}")
    if kind == "dense":
        return "dense", _check_dense_teacher(n, teacher_hidden, teacher_weight, teacher_bias)
    if kind == "logits":
        _tensor("teacher_logits", teacher_logits, 2, floating=True)
        _rows("teacher_logits", teacher_logits, n)
        return "dense", teacher_logits.shape[1]
    if kind == "sparse":
        _check_sparse_teacher(n, divergence, teacher_topk_ids, teacher_topk_logprobs)
        return "sparse", None
    if kind == "sampled":
        _tensor("teacher_logprobs", teacher_logprobs, 1, floating=True)
        _rows("teacher_logprobs", teacher_logprobs, n)
        return "sampled", None
    return "none", None


def _check_dense_teacher(n, teacher_hidden, teacher_weight, teacher_bias) -> int:
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("a dense teacher needs both teacher_hidden [N, Ht] and teacher_weight [Vt, Ht]")
    _tensor("teacher_hidden", teacher_hidden, 2, floating=True)
    _tensor("teacher_weight", teacher_weight, 2, floating=True)
    _rows("teacher_hidden", teacher_hidden, n)
    if teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(f"teacher_weight has Ht={teacher_weight.shape[1]} columns but teacher_hidden "
                         f"has Ht={teacher_hidden.shape[1]}")
    v_teacher = teacher_weight.shape[0]
    if teacher_bias is not None:
        _tensor("teacher_bias", teacher_bias, 1, floating=True)
        if teacher_bias.shape[0] != v_teacher:
            raise ValueError(f"teacher_bias has {teacher_bias.shape[0]} entries, teacher_weight has Vt={v_teacher}")
    return v_teacher


def _check_sparse_teacher(n, divergence, teacher_topk_ids, teacher_topk_logprobs) -> None:
    if teacher_topk_ids is None or teacher_topk_logprobs is None:
        raise ValueError("a sparse teacher needs both teacher_topk_ids [N, K] and teacher_topk_logprobs [N, K]")
    _tensor("teacher_topk_ids", teacher_topk_ids, 2)
    if teacher_topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_topk_ids must be an integer tensor, got dtype {teacher_topk_ids.dtype}")
    _tensor("teacher_topk_logprobs", teacher_topk_logprobs, 2, floating=True)
    _rows("teacher_topk_ids", teacher_topk_ids, n)
    _rows("teacher_topk_logprobs", teacher_topk_logprobs, n)
    if teacher_topk_ids.shape[1] != teacher_topk_logprobs.shape[1]:
        raise ValueError(f"K mismatch: teacher_topk_ids has K={teacher_topk_ids.shape[1]} but "
                         f"teacher_topk_logprobs has K={teacher_topk_logprobs.shape[1]}")
    if teacher_topk_ids.shape[1] < 1:
        raise ValueError("teacher_topk_ids must have K >= 1 columns")
    if divergence != "forward_kl":
        raise ValueError(f"a sparse (top-k) teacher supports divergence='forward_kl' only, got {divergence!r}")


def _resolve_vocab(vocab_size, v_student: int, v_teacher: int | None, teacher_logits: bool) -> int:
    if teacher_logits:
        # Logits of a teacher whose head is padded further than the student's: the first columns are used.
        vocab = _resolve_vocab(vocab_size, v_student, None, False)
        if v_teacher < vocab:
            raise ValueError(f"teacher_logits has {v_teacher} columns, fewer than the {vocab} vocabulary entries "
                             "in use (student_weight rows or vocab_size)")
        return vocab
    if vocab_size is None:
        if v_teacher is not None and v_teacher != v_student:
            raise ValueError(f"student head has V={v_student} rows but teacher head has Vt={v_teacher}; "
                             "pass vocab_size=n to use the first n rows of both")
        return v_student
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > v_student:
        raise ValueError(f"vocab_size={vocab_size} exceeds the student head's V={v_student} rows")
    if v_teacher is not None and vocab_size > v_teacher:
        raise ValueError(f"vocab_size={vocab_size} exceeds the teacher head's Vt={v_teacher} rows")
    return vocab_size


def _check_live_values(n, live, target_ids, lam, teacher_topk_ids, vocab: int) -> None:
    """Values that matter only on rows the loss reads (padding rows may hold anything)."""
    if n == 0 or not bool(live.any()):
        return
    t = target_ids[live]
    if bool(((t < 0) | (t >= vocab)).any()):
        bad = int(t[(t < 0) | (t >= vocab)][0])
        raise ValueError(f"target_ids must be in [0, {vocab}) on rows where loss_mask is True, found {bad}")
    lv = lam[live]
    if not bool(((lv >= 0) & (lv <= 1)).all()):
        bad = float(lv[~((lv >= 0) & (lv <= 1))][0])
        raise ValueError(f"lam must be in [0, 1] on rows where loss_mask is True, found {bad}")
    if teacher_topk_ids is not None:
        k_ids = teacher_topk_ids[live]
        if bool(((k_ids < 0) | (k_ids >= vocab)).any()):
            raise ValueError(f"teacher_topk_ids must be in [0, {vocab}) on rows where loss_mask is True")
