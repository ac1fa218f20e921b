"""Forward passes over variable-length sequences, packed or padded.

Rollouts produce B sequences of different lengths. Concatenated into one row with
per-sequence ``position_ids`` (flash-attn's varlen layout), they go through a Hugging Face
model with no padding at all: transformers derives the sequence boundaries from the
position ids, for flash-attention 2 (varlen kernels) and for SDPA/eager (a block-diagonal
mask). Packing pays off with flash-attention; with SDPA the block-diagonal mask costs
O(T²) memory, so ``mode="auto"`` packs only for flash-attention and pads otherwise (right
padding under the causal mask alone: no padding mask is needed).

Both modes return the hidden states in the packed layout ``[T, H]`` (T = Σ lengths), so
callers never see which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("auto", "packed", "padded")


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
        mode: ``"packed"`` (one row, position ids), ``"padded"`` (right padding + attention
            mask) or ``"auto"`` (packed for flash-attention, padded otherwise).

    Returns:
        ``[T, H]`` in the packed order.
    """
    mode = resolve_mode(backbone, mode)
    if mode == "packed":
        # use_cache=False matters: with a cache object present transformers does not look
        # for sequence boundaries in the position ids.
        out = backbone(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None], use_cache=False)
        return out.last_hidden_state[0]
    b, lmax = len(packed.lengths), packed.max_seqlen
    ids = packed.input_ids.new_zeros(b, lmax)
    rows = torch.repeat_interleave(torch.arange(b, device=ids.device), torch.tensor(packed.lengths, device=ids.device))
    cols = packed.position_ids
    ids[rows, cols] = packed.input_ids
    # Right padding needs no padding mask: under the causal mask a real token only sees the tokens before it, all
    # real. Without a mask tensor, attention runs its causal kernels (no [B, 1, L, L] mask to build and read),
    # much faster on the CPU; the padding rows' outputs are garbage and never read.
    out = backbone(input_ids=ids, use_cache=False)
    return out.last_hidden_state[rows, cols]
