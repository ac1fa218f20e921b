"""Forward passes over variable-length sequences, packed or padded.

Rollouts produce B sequences of different lengths. Concatenated into one row with
per-sequence ``position_ids`` (flash-attn's varlen layout), they go through a Hugging Face
model with no padding at all: transformers derives the sequence boundaries from the
position ids, for flash-attention 2 (varlen kernels) and for SDPA/eager (a block-diagonal
mask). Packing pays off with flash-attention; with SDPA the block-diagonal mask costs
O(T²) memory, so ``mode="auto"`` packs only for flash-attention and pads otherwise (right
padding under the causal mask alone: no padding mask is needed). Padded sequences are sorted into
a few batches of similar length (:func:`length_buckets`) where that saves more padded positions
than the extra forward calls cost: rollout lengths spread (e.g. 119–243 tokens in a step of the
default run), and every padded position costs a token's compute and attention. (A sequence's
hidden states then round differently, by about 1e-7 relative: SDPA's CPU kernel rounds by the
padded length it runs at.)

Both modes return the hidden states in the packed layout ``[T, H]`` (T = Σ lengths), so
callers never see which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("auto", "packed", "padded")
CALL_TOKENS = 256
"""Padded positions one more length bucket must save to pay for its forward call: about a call's fixed cost on the
CPU, counted in tokens of the tiny built-in models (on a GPU, a small share of a batch's padding)."""
MAX_BUCKETS = 4
"""At most this many padded forwards per pass."""


@dataclass(frozen=True)
class Packed:
    """B sequences laid end to end."""

    input_ids: torch.Tensor   # [T]
    position_ids: torch.Tensor  # [T], restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # [B+1] int64 offsets
    lengths: list[int]

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)


def pack(sequences: list[torch.Tensor]) -> Packed:
    """Concatenate 1-D token tensors. ``[L_b]`` x B -> :class:`Packed` with ``[T]`` fields."""
    if not sequences:
        raise ValueError("sequences must hold at least one sequence")
    for i, s in enumerate(sequences):
        if not isinstance(s, torch.Tensor) or s.dim() != 1:
            raise ValueError(f"sequences[{i}] must be a 1-D tensor of token ids, got {type(s).__name__} "
                             f"with shape {tuple(getattr(s, 'shape', ()))}")
        if s.numel() == 0:
            raise ValueError(f"sequences[{i}] is empty; drop empty sequences before packing")
    lengths = [int(s.numel()) for s in sequences]
    device = sequences[0].device
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])
    return Packed(torch.cat(sequences), position_ids, cu, lengths)


def _attn_implementation(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None) or "eager")


def resolve_mode(model, mode: str = "auto") -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "packed" if _attn_implementation(model).startswith("flash_attention") else "padded"


def last_hidden_states(backbone, packed: Packed, *, mode: str = "auto") -> torch.Tensor:
    """Last hidden states of ``backbone`` (e.g. ``model.model`` of a causal LM) for every token.

    Args:
        backbone: a transformers base model returning ``last_hidden_state``.
        packed: the sequences, from :func:`pack`.
        mode: ``"packed"`` (one row, position ids), ``"padded"`` (right padding, in length
            buckets) or ``"auto"`` (packed for flash-attention, padded otherwise).

    Returns:
        ``[T, H]`` in the packed order.
    """
    mode = resolve_mode(backbone, mode)
    if mode == "packed":
        # use_cache=False matters: with a cache object present transformers does not look
        # for sequence boundaries in the position ids.
        out = backbone(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None], use_cache=False)
        return out.last_hidden_state[0]
    groups = length_buckets(packed.lengths)
    if len(groups) == 1:
        return _padded(backbone, packed.input_ids, packed.position_ids, packed.lengths)
    # One padded forward per bucket; the buckets' rows are then put back in the packed order.
    starts = packed.cu_seqlens.tolist()
    outs, order = [], []
    for g in groups:
        tok = torch.cat([torch.arange(starts[i], starts[i + 1], device=packed.input_ids.device) for i in g])
        outs.append(_padded(backbone, packed.input_ids[tok], packed.position_ids[tok], [packed.lengths[i] for i in g]))
        order.append(tok)
    where = torch.empty_like(packed.input_ids)
    where[torch.cat(order)] = torch.arange(where.numel(), device=where.device)
    return torch.cat(outs).index_select(0, where)


def _padded(backbone, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The sequences (packed in ``input_ids``) right-padded to the longest in one batch. -> ``[T, H]``"""
    b, lmax = len(lengths), max(lengths)
    ids = input_ids.new_zeros(b, lmax)
    rows = torch.repeat_interleave(torch.arange(b, device=ids.device), torch.tensor(lengths, device=ids.device))
    ids[rows, position_ids] = input_ids
    # Right padding needs no padding mask: under the causal mask a real token only sees the tokens before it, all
    # real. Without a mask tensor, attention runs its causal kernels (no [B, 1, L, L] mask to build and read),
    # much faster on the CPU; the padding rows' outputs are garbage and never read.
    out = backbone(input_ids=ids, use_cache=False)
    return out.last_hidden_state[rows, position_ids]


def length_buckets(lengths: list[int], *, call_tokens: int = CALL_TOKENS,
                   max_buckets: int = MAX_BUCKETS) -> list[list[int]]:
    """Sequence indices grouped into at most ``max_buckets`` batches of similar length (shortest first), chosen to
    minimize the padded tokens plus ``call_tokens`` per batch: a split must save more padding than a forward call
    costs. -> list of index lists, every index once"""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if not order:
        return [[]]
    # Batches end where the length changes: over the distinct lengths u, with n_j sequences up to u_j (inclusive),
    # cost[k][j] is the least cost of those n_j sequences in k batches (the last one padded to u_j).
    u, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    n = np.concatenate([[0], np.cumsum(counts)])
    m = len(u)
    cost = np.full((max_buckets + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    cut = np.zeros((max_buckets + 1, m + 1), dtype=np.int64)
    for k in range(1, max_buckets + 1):
        for j in range(1, m + 1):
            c = cost[k - 1, :j] + call_tokens + (n[j] - n[:j]) * u[j - 1]
            cut[k, j] = int(np.argmin(c))
            cost[k, j] = c[cut[k, j]]
    k, j, groups = int(np.argmin(cost[1:, m])) + 1, m, []
    while k:
        i = cut[k, j]
        groups.append(order[n[i]:n[j]])
        j, k = i, k - 1
    return groups[::-1]
