"""Argument checking for ``compute_gae``, shared by every backend.

Structural checks (shapes, dtypes, ``cu_seqlens``, γ, λ, ``bootstrap_values``) cost O(B) and
run here before any backend. Checks on the per-token values (finite rewards and values, no
reward on a non-action token) cost a pass over the data, so the fast backends fold them into
their own pass and call :func:`check_token_values` only to explain a failure; every backend
therefore raises the same ValueError for the same bad input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class GaeInputs:
    """Validated inputs of one ``compute_gae`` call, as torch tensors on one device.

    ``rewards`` and ``values`` keep their floating dtype; ``cu_seqlens`` is int64 on the data's
    device and ``cu_host`` the same offsets as a host numpy array; ``bootstrap`` is float64.
    ``kind`` is ``"numpy"`` or ``"torch"``: what the caller passed and gets back.
    """

    rewards: torch.Tensor            # [T]
    values: torch.Tensor             # [T]
    action_mask: torch.Tensor        # [T] bool
    cu_seqlens: torch.Tensor         # [B+1] int64
    cu_host: np.ndarray              # [B+1] int64
    bootstrap: torch.Tensor | None   # [B] float64
    gamma: float
    lam: float
    kind: str

    @property
    def num_tokens(self) -> int:
        return self.rewards.shape[0]


def _to_torch(name: str, x) -> tuple[torch.Tensor, str]:
    if isinstance(x, torch.Tensor):
        return x, "torch"
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write to inputs
            x = x.copy()
        return torch.from_numpy(x), "numpy"
    raise ValueError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def _per_token(name: str, x, *, floating: bool) -> tuple[torch.Tensor, str]:
    t, kind = _to_torch(name, x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [T] (packed tokens), got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point array, got dtype {t.dtype}")
    if not floating and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool array (True on action tokens), got dtype {t.dtype}; "
                         "convert it with .bool() / .astype(bool)")
    return t.contiguous(), kind


def _unit_interval(name: str, x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}") from None
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {v}")
    return v


def _cu_seqlens(cu_seqlens, T: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    host = cu_seqlens.detach().cpu().numpy() if isinstance(cu_seqlens, torch.Tensor) else np.asarray(cu_seqlens)
    if host.ndim != 1 or host.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with at least one entry, got shape {host.shape}")
    if host.dtype.kind not in "iu":
        raise ValueError(f"cu_seqlens must hold integers, got dtype {host.dtype}")
    host = host.astype(np.int64, copy=False)
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {host[0]}")
    drops = np.flatnonzero(np.diff(host) < 0)
    if drops.size:
        b = int(drops[0])
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{b}] = {host[b]} > "
                         f"cu_seqlens[{b + 1}] = {host[b + 1]}")
    if host[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T} (the number of packed tokens), "
                         f"got cu_seqlens[-1] = {host[-1]}")
    dev = torch.from_numpy(np.ascontiguousarray(host)).to(device)
    return dev, host


def validate(rewards, values, cu_seqlens, action_mask, *, gamma, lam, bootstrap_values) -> GaeInputs:
    r, kind = _per_token("rewards", rewards, floating=True)
    v, kind_v = _per_token("values", values, floating=True)
    m, kind_m = _per_token("action_mask", action_mask, floating=False)
    if not (kind == kind_v == kind_m):
        raise ValueError("rewards, values and action_mask must all be torch tensors or all numpy arrays, "
                         f"got {kind}, {kind_v} and {kind_m}")
    T = r.shape[0]
    for name, t in (("values", v), ("action_mask", m)):
        if t.shape[0] != T:
            raise ValueError(f"{name} has {t.shape[0]} tokens but rewards has T = {T}; all per-token inputs need T")
        if t.device != r.device:
            raise ValueError(f"{name} is on {t.device} but rewards is on {r.device}")
    g = _unit_interval("gamma", gamma)
    l = _unit_interval("lam", lam)
    cu, cu_host = _cu_seqlens(cu_seqlens, T, r.device)
    B = cu_host.shape[0] - 1

    boot = None
    if bootstrap_values is not None:
        if isinstance(bootstrap_values, (list, tuple)):
            bootstrap_values = np.asarray(bootstrap_values, dtype=np.float64)
        bt, _ = _to_torch("bootstrap_values", bootstrap_values)
        if bt.dim() != 1 or bt.shape[0] != B:
            raise ValueError(f"bootstrap_values must be 1-D [B] with B = {B} trajectories (len(cu_seqlens) - 1), "
                             f"got shape {tuple(bt.shape)}")
        if not (bt.dtype.is_floating_point or bt.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"bootstrap_values must be floating-point, got dtype {bt.dtype}")
        bt = bt.detach().to(device=r.device, dtype=torch.float64)
        bad = torch.nonzero(~torch.isfinite(bt)).flatten()
        if bad.numel():
            b = int(bad[0])
            raise ValueError(f"bootstrap_values must be finite, got bootstrap_values[{b}] = {float(bt[b])}")
        boot = bt.contiguous()

    return GaeInputs(rewards=r.detach(), values=v.detach(), action_mask=m, cu_seqlens=cu, cu_host=cu_host,
                     bootstrap=boot, gamma=g, lam=l, kind=kind)


def _trajectory_of(cu_host: np.ndarray, i: int) -> int:
    """Index b of the trajectory holding token i (empty trajectories hold none)."""
    return int(np.searchsorted(cu_host, i, side="right")) - 1


def check_token_values(x: GaeInputs) -> None:
    """Raise the ValueError for the first bad per-token value; return if there is none."""
    r, v, m = x.rewards, x.values, x.action_mask
    for name, t in (("rewards", r), ("values", v)):
        bad = torch.nonzero(~torch.isfinite(t)).flatten()
        if bad.numel():
            i = int(bad[0])
            b = _trajectory_of(x.cu_host, i)
            raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(t[i])} (trajectory {b})")
    misplaced = torch.nonzero((r != 0) & ~m).flatten()
    if misplaced.numel():
        i = int(misplaced[0])
        b = _trajectory_of(x.cu_host, i)
        s, e = int(x.cu_host[b]), int(x.cu_host[b + 1])
        raise ValueError(
            f"rewards[{i}] = {float(r[i])} lies on a non-action token (action_mask[{i}] is False) of trajectory "
            f"{b} (tokens {s}..{e - 1}); GAE skips non-action tokens, so this reward would be lost. Put the reward "
            "on the last action token of its turn (turn_rewards_to_tokens does this)."
        )
