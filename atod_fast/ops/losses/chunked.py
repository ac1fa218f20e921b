"""Chunked ATOD loss: the host side shared by the ``torch`` and ``triton`` backends.

Masked rows are dropped first. The live rows are then processed in chunks of C rows: the
chunk's student (and teacher) logits ``[C, V]`` in float32, one row function over them
(plain PyTorch or the Triton kernel) that returns the per-row terms and overwrites the
student logits with d(loss)/d(logits), then ``grad_hidden = dlogits @ W`` and
``grad_W += dlogitsᵀ @ h`` accumulated in float32. Every per-token factor (λ, A, old, ref,
the normalizer) is already inside dlogits, so the backward only scales by grad_output.
Nothing with N×V elements is ever allocated; peak extra memory is a few ``[C, V]`` buffers
plus one float32 copy of the head's gradient.
"""

from __future__ import annotations

import torch

from atod_fast.kernels.codes import OUT_FIELDS

from .inputs import LossInputs
from .rows_compiled import COMPILED_ROW_BUFFERS, compiled_rows, row_slice, use_compiled
from .rowwise import TORCH_ROW_BUFFERS, torch_rows

HALF = (torch.bfloat16, torch.float16)
CPU_BUDGET_BYTES = 256 << 20
"""Working-set budget of one chunk on the CPU (there is no free-memory query worth trusting)."""
GPU_BUDGET_BYTES = (256 << 20, 4 << 30)
"""On CUDA the chunk gets a quarter of the free memory, clamped to this range."""


def mm_acc(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated and returned in ``dt``.

    Half-precision operands on CUDA stay on the tensor cores with a float32 output (never
    rounded to bf16 logits); everywhere else both operands are promoted to ``dt``.
    """
    if a.is_cuda and dt == torch.float32 and b.dtype in HALF:
        a = a.to(b.dtype)
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch: no out_dtype; stay exact, pay fp32 speed
            return a.float() @ b.float()
    return a.to(dt) @ b.to(dt)


class Head:
    """The first ``vocab`` rows of an LM head, ready for ``logits(h)`` in ``dt``."""

    def __init__(self, weight, bias, vocab: int, dt: torch.dtype):
        w = weight.detach()[:vocab]
        keep = w.dtype == dt or (w.is_cuda and dt == torch.float32 and w.dtype in HALF)
        self.w = w if keep else w.to(dt)  # promoted once per call, not once per chunk
        self.b = None if bias is None else bias.detach()[:vocab].to(dt)
        self.dt = dt

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits ``h Wᵀ + b``, into ``out`` (a reused [C, vocab] buffer) if dtypes allow. [C, H] -> [C, vocab]"""
        if out is not None and h.dtype == self.w.dtype == self.dt:
            z = torch.mm(h, self.w.t(), out=out[: h.shape[0]])
        else:
            z = mm_acc(h, self.w.t(), self.dt)
        if self.b is not None:
            z += self.b
        return z


def choose_chunk_size(n_rows: int, vocab: int, hidden: int, *, row_buffers: int, device: torch.device) -> int:
    """Rows per chunk: ``row_buffers`` float32 ``[C, vocab]`` buffers plus the chunk's ``[C, hidden]``
    rows (hidden = H + Ht) within the budget, rounded to whole 64-row matmul tiles when possible."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 4, GPU_BUDGET_BYTES[0]), GPU_BUDGET_BYTES[1])
    else:
        budget = CPU_BUDGET_BYTES
    c = max(1, budget // (4 * (vocab * row_buffers + 2 * hidden)))
    if c >= 64:
        c = c // 64 * 64
    c = max(1, min(c, n_rows))
    if n_rows == 0:
        return c
    return -(-n_rows // -(-n_rows // c))  # equal chunks: no small last chunk for a matmul to waste time on


def scaled_copy(dst: torch.Tensor, src: torch.Tensor, g: torch.Tensor, block_bytes: int = 64 << 20) -> None:
    """``dst[:len(src)] = src · g`` in blocks of rows, so the float32 product never needs a second
    [V, H] buffer (2.5 GB at V = 152k, H = 4096); ``src`` stays intact for a repeated backward."""
    rows = max(1, block_bytes // max(1, src[0].numel() * src.element_size())) if src.numel() else 1
    for i in range(0, src.shape[0], rows):
        j = min(i + rows, src.shape[0])
        dst[i:j] = src[i:j] * g


def _compiled_or_eager(zs, *args, **kw):
    """The compiled row function, or the eager one (same contract) if compilation failed; the eager
    one then runs on slices of the chunk sized for its own buffer count, to stay in the budget."""
    out = compiled_rows(zs, *args, **kw)
    if out is not None:
        return out
    step = max(1, zs.shape[0] * COMPILED_ROW_BUFFERS // TORCH_ROW_BUFFERS)
    outs = []
    *rows, scale = args
    tlp = kw.pop("teacher_logprobs", None)
    for i in range(0, zs.shape[0], step):
        j = i + step
        outs.append(torch_rows(zs[i:j], *(row_slice(t, i, j) for t in rows), scale,
                               teacher_logprobs=row_slice(tlp, i, j), **kw))
    return torch.cat(outs, dim=1)


def _rows_fn(kind: str, dt: torch.dtype, device: torch.device, elements: int):
    """(row function, [C, V] buffers it keeps alive per chunk row) for this backend and problem."""
    if kind == "torch":
        if use_compiled(device, dt, elements):
            return _compiled_or_eager, COMPILED_ROW_BUFFERS
        return torch_rows, TORCH_ROW_BUFFERS
    from atod_fast.kernels.atod_loss import atod_rows

    return atod_rows, 3


def _grad_matmuls(dz, hc, w, grad_h_rows, grad_w, dt):
    """``grad_h_rows = dz @ W`` and ``grad_w += dzᵀ @ h`` for one chunk (either may be None)."""
    # Half-precision heads on CUDA: one rounded copy of dz feeds both tensor-core matmuls.
    dz_op = dz.to(w.dtype) if w.dtype in HALF else dz
    same = dz_op.dtype == w.dtype == hc.dtype == dt
    if grad_h_rows is not None:
        if same:
            torch.mm(dz_op, w, out=grad_h_rows)
        else:
            grad_h_rows.copy_(mm_acc(dz_op, w, dt))
    if grad_w is not None:
        if same:  # accumulated in place: no [V, H] temporary per chunk
            grad_w.addmm_(dz_op.t(), hc)
        else:
            grad_w += mm_acc(dz_op.t(), hc, dt)


def teacher_chunks(x: LossInputs, idx: torch.Tensor, dt: torch.dtype, rows: int):
    """``zt(s, e)``: the dense teacher's raw logits of live rows ``idx[s:e]`` (None without a dense teacher), in one
    ``[rows, V]`` buffer reused by every chunk where the dtypes allow (the row function overwrites its zt)."""
    if x.teacher != "dense":
        return lambda s, e: None
    dev, vocab = idx.device, x.vocab
    if x.teacher_logits is not None:  # given logits: the first `vocab` columns, gathered row by row
        given = x.teacher_logits.detach()[:, :vocab]
        if given.dtype != dt:
            return lambda s, e: given.index_select(0, idx[s:e]).to(dt)
        buf = torch.empty(rows, vocab, dtype=dt, device=dev)
        return lambda s, e: torch.index_select(given, 0, idx[s:e], out=buf[: e - s])
    head = Head(x.teacher_weight, x.teacher_bias, vocab, dt)
    ht = x.teacher_hidden.detach().index_select(0, idx)
    buf = torch.empty(rows, vocab, dtype=dt, device=dev) if head.w.dtype == dt else None
    return lambda s, e: head.logits(ht[s:e], buf)


class _ChunkedAtodLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, x: LossInputs, kind: str, sink: dict):
        hp = x.hp
        dt = torch.float64 if (kind == "torch" and h_s.dtype == torch.float64) else torch.float32
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        write_grad = need_h or need_w or need_b
        n, hdim = h_s.shape
        dev = h_s.device
        vocab = x.vocab

        idx = x.loss_mask.nonzero().squeeze(1)
        n_live = idx.numel()
        out = torch.zeros(len(OUT_FIELDS), n, dtype=dt, device=dev)  # masked rows report 0
        if x.normalizer is None:
            denom = torch.tensor(float(max(n_live, 1)), dtype=dt, device=dev)
        else:
            denom = torch.as_tensor(x.normalizer, device=dev).detach().to(dt).reshape(())
        scale = (1.0 / hp.temperature / denom).reshape(1)

        student = Head(w_s, b_s, vocab, dt)
        grad_h = torch.zeros(n_live, hdim, dtype=dt, device=dev) if need_h else None
        grad_w = torch.zeros(vocab, hdim, dtype=dt, device=dev) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dt, device=dev) if need_b and b_s is not None else None

        # Only live rows are gathered: padding garbage (-100 targets, NaN advantages) never enters.
        h_live = h_s.detach().index_select(0, idx)
        tgt = x.target_ids.index_select(0, idx).contiguous()

        def rows(t):  # the live rows of an optional per-row input, in dt
            return None if t is None else t.detach().index_select(0, idx).to(dt)

        old, adv, lam, ref, tlp = (rows(t) for t in (x.old_logprobs, x.advantages, x.lam, x.ref_logprobs,
                                                     x.teacher_logprobs))
        if x.teacher == "sparse":
            ids = x.teacher_topk_ids.index_select(0, idx)
            lp_hat = torch.log_softmax(x.teacher_topk_logprobs.detach().index_select(0, idx).to(dt), dim=-1)
            p_hat = lp_hat.exp()
            pos = p_hat > 0  # -inf teacher entries contribute nothing (0·log 0 = 0)
            p_hat = torch.where(pos, p_hat, torch.zeros_like(p_hat))
            plogp = torch.where(pos, p_hat * lp_hat, torch.zeros_like(p_hat))

        dense_hidden = x.teacher == "dense" and x.teacher_logits is None
        hid = hdim + (x.teacher_hidden.shape[1] if dense_hidden else 0)
        rows_fn, row_buffers = _rows_fn(kind, dt, dev, n_live * vocab)
        chunk = x.chunk_size or choose_chunk_size(n_live, vocab, hid, row_buffers=row_buffers, device=dev)
        # [C, V] buffers reused by every chunk: on the CPU a fresh one per chunk costs a page fault per 4 KiB.
        zs_buf = torch.empty(min(chunk, n_live), vocab, dtype=dt, device=dev) if student.w.dtype == dt else None
        teacher_logits = teacher_chunks(x, idx, dt, min(chunk, n_live))
        kw = dict(teacher=x.teacher, divergence=hp.divergence, jsd_beta=hp.jsd_beta, temperature=hp.temperature,
                  clip_eps_low=hp.clip_eps_low, clip_eps_high=hp.clip_eps_high, dual_clip=hp.dual_clip,
                  kl_coef=hp.kl_coef, entropy_coef=hp.entropy_coef, write_grad=write_grad)
        for s in range(0, n_live, chunk):
            e = min(s + chunk, n_live)
            hc = h_live[s:e]
            zs = student.logits(hc, zs_buf)
            zt = teacher_logits(s, e)
            sp = None
            if x.teacher == "sparse":
                z_id = zs.gather(1, ids[s:e]) * (1.0 / hp.temperature)
                ph = p_hat[s:e]
                sp = torch.stack([plogp[s:e].sum(-1), (ph * z_id).sum(-1), ph.sum(-1)], dim=1).contiguous()
            if tlp is not None:  # only a row function that has the sampled teacher gets the keyword
                kw["teacher_logprobs"] = tlp[s:e]
            o = rows_fn(zs, zt, tgt[s:e], *(row_slice(t, s, e) for t in (old, adv, lam, ref)), sp, scale, **kw)
            out.index_copy_(1, idx[s:e], o.to(dt))
            if not write_grad:
                continue
            dz = zs  # overwritten in place by the row function
            if x.teacher == "sparse":
                dz.scatter_add_(1, ids[s:e], -(lam[s:e, None] * scale) * p_hat[s:e])
            if grad_b is not None:
                grad_b += dz.sum(0)
            _grad_matmuls(dz, hc, student.w, None if grad_h is None else grad_h[s:e], grad_w, dt)
            del zs, zt, dz

        loss = out[0].sum() / denom
        ctx.save_for_backward(idx, grad_h, grad_w, grad_b)
        ctx.meta = [None if t is None else (t.shape, t.dtype) for t in (h_s, w_s, b_s)]
        for i, name in enumerate(OUT_FIELDS[1:], start=1):
            sink[name] = out[i] > 0.5 if name == "clipped" else out[i]
        return loss

    @staticmethod
    def backward(ctx, g):
        idx, grad_h, grad_w, grad_b = ctx.saved_tensors
        (h_shape, h_dt), (w_shape, w_dt), b_meta = ctx.meta
        gh = gw = gb = None
        if grad_h is not None:
            gh = torch.zeros(h_shape, dtype=h_dt, device=g.device)
            gh.index_copy_(0, idx, (grad_h * g).to(h_dt))
        if grad_w is not None:
            # Rows past the used vocabulary get 0; the rest are written once (no zero fill first).
            gw = torch.empty(w_shape, dtype=w_dt, device=g.device)
            gw[grad_w.shape[0]:].zero_()
            scaled_copy(gw, grad_w, g)
        if grad_b is not None:
            gb = torch.zeros(b_meta[0], dtype=b_meta[1], device=g.device)
            gb[: grad_b.shape[0]] = grad_b * g
        return gh, gw, gb, None, None, None


def atod_loss_chunked(x: LossInputs, kind: str):
    """The ``torch`` (kind="torch") and ``triton`` (kind="triton") backends of ``atod_loss``."""
    sink: dict = {}
    loss = _ChunkedAtodLoss.apply(x.student_hidden, x.student_weight, x.student_bias, x, kind, sink)
    return loss, sink
