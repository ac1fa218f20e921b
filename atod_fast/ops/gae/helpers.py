"""Advantage utilities beside ``compute_gae``: reward placement, whitening, group baselines.

Each accepts torch tensors or numpy arrays and returns the same kind (float32).
"""

from __future__ import annotations

import torch

from .inputs import _cu_seqlens, _per_token, _to_torch


def _back(t: torch.Tensor, kind: str):
    return t.cpu().numpy() if kind == "numpy" else t


def turn_rewards_to_tokens(
    cu_seqlens,
    action_mask,
    *,
    turn_rewards=None,
    final_scores=None,
    turn_ids=None,
):
    """Per-token rewards for ``compute_gae`` from per-turn rewards and/or per-episode scores.

    Turn k of trajectory b is, by default, its k-th maximal run of consecutive action tokens
    (an assistant message); with ``turn_ids`` it is the set of its action tokens whose
    ``turn_ids`` equal k. The reward of a turn goes on that turn's last action token; the
    final score of a trajectory goes on its last action token (added to a turn reward
    already there). Nothing is dropped: a nonzero reward for a turn or trajectory that has
    no action token is a ValueError.

    Args:
        cu_seqlens: ``[B+1]`` int offsets of the packed trajectories.
        action_mask: ``[T]`` bool, True on the agent's tokens.
        turn_rewards: ``[B, K]`` float, reward of turn k of trajectory b; K may exceed a
            trajectory's number of turns if the extra entries are 0 (padding).
        final_scores: ``[B]`` float, episode score of each trajectory.
        turn_ids: ``[T]`` int ≥ 0, turn index of each token within its trajectory (only read
            on action tokens), e.g. the ``turn_idx`` given to ``AnnealSchedule``.

    Returns:
        ``[T]`` float32 rewards of ``action_mask``'s kind and device.
    """
    m, kind = _per_token("action_mask", action_mask, floating=False)
    T, dev = m.shape[0], m.device
    cu, cu_host = _cu_seqlens(cu_seqlens, T, dev)
    B = cu_host.shape[0] - 1
    out = torch.zeros(T, dtype=torch.float64, device=dev)
    pos = torch.nonzero(m).flatten()
    traj = torch.searchsorted(cu[1:], pos, right=True)
    if turn_rewards is not None:
        _place_turn_rewards(out, turn_rewards, turn_ids, pos, traj, B, T)
    if final_scores is not None:
        _place_final_scores(out, final_scores, pos, traj, B)
    return _back(out.float(), kind)


def _turn_of_action_tokens(pos, traj, turn_ids, B: int, T: int) -> torch.Tensor:
    """Turn index of every action token: from ``turn_ids``, else the rank of its run of adjacent action tokens."""
    dev = pos.device
    if turn_ids is not None:
        ti, _ = _per_token_int("turn_ids", turn_ids, T)
        turn = ti.to(dev)[pos]
        if turn.numel() and int(turn.min()) < 0:
            raise ValueError("turn_ids must be ≥ 0 on action tokens")
        return turn
    starts = torch.ones_like(pos, dtype=torch.bool)
    if pos.numel() > 1:  # a new run where the previous action token is not adjacent or in another trajectory
        starts[1:] = (pos[1:] != pos[:-1] + 1) | (traj[1:] != traj[:-1])
    run = torch.cumsum(starts.long(), 0) - 1
    first_run = torch.zeros(B, dtype=torch.long, device=dev)
    first_run.scatter_reduce_(0, traj, run, reduce="amin", include_self=False)
    return run - first_run[traj]


def _per_trajectory(name: str, x, shape: str, dim: int, B: int, dev) -> torch.Tensor:
    """``x`` as finite float64 on ``dev``, ``dim``-D with B rows (one per trajectory)."""
    t, _ = _to_torch(name, x)
    if t.dim() != dim or t.shape[0] != B:
        raise ValueError(f"{name} must be {shape} with B = {B}, got shape {tuple(t.shape)}")
    t = t.to(device=dev, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


def _place_turn_rewards(out, turn_rewards, turn_ids, pos, traj, B: int, T: int) -> None:
    dev = out.device
    tr = _per_trajectory("turn_rewards", turn_rewards, "2-D [B, K]", 2, B, dev)
    K = tr.shape[1]
    turn = _turn_of_action_tokens(pos, traj, turn_ids, B, T)
    n_turns = torch.zeros(B, dtype=torch.long, device=dev)
    if pos.numel():
        n_turns.scatter_reduce_(0, traj, turn + 1, reduce="amax", include_self=True)
    lost = (tr != 0) & (torch.arange(K, device=dev)[None, :] >= n_turns[:, None])
    if lost.any():
        b, k = (int(i) for i in torch.nonzero(lost)[0])
        raise ValueError(f"turn_rewards[{b}, {k}] = {float(tr[b, k])} but trajectory {b} has "
                         f"{int(n_turns[b])} turn(s) with action tokens; the reward would be lost")
    key = traj * max(K, 1) + turn
    ok = turn < K
    last_pos = torch.full((B * max(K, 1),), -1, dtype=torch.long, device=dev)
    last_pos.scatter_reduce_(0, key[ok], pos[ok], reduce="amax", include_self=True)
    flat = tr.reshape(-1)
    has = last_pos >= 0
    out.index_add_(0, last_pos[has], flat[has])


def _place_final_scores(out, final_scores, pos, traj, B: int) -> None:
    dev = out.device
    fs = _per_trajectory("final_scores", final_scores, "1-D [B]", 1, B, dev)
    has_action = torch.zeros(B, dtype=torch.bool, device=dev)
    has_action[traj] = True
    lost = (fs != 0) & ~has_action
    if lost.any():
        b = int(torch.nonzero(lost)[0])
        raise ValueError(f"final_scores[{b}] = {float(fs[b])} but trajectory {b} has no action token; "
                         "the score would be lost")
    is_last = torch.ones_like(pos, dtype=torch.bool)
    if pos.numel() > 1:
        is_last[:-1] = traj[1:] != traj[:-1]
    out.index_add_(0, pos[is_last], fs[traj[is_last]])


def _per_token_int(name, x, T):
    t, kind = _to_torch(name, x)
    if t.dim() != 1 or t.shape[0] != T:
        raise ValueError(f"{name} must be 1-D [T] with T = {T}, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.long(), kind


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
    """Whiten ``x`` with the mean and variance of its masked entries: (x − μ)/√(σ² + eps).

    σ² is the unbiased (Bessel-corrected) variance over the entries with ``mask`` True, as in
    TRL and verl; with a single masked entry σ² is 0. Entries with ``mask`` False are 0 in the
    output. ``shift_mean=False`` keeps the mean (divides by the std only). Statistics are in
    float64; the output is float32.

    Args:
        x: ``[...]`` float (e.g. advantages ``[T]``).
        mask: bool of ``x``'s shape.

    Returns:
        float32 of ``x``'s shape, kind and device.
    """
    xt, kind = _to_torch("x", x)
    mt, _ = _to_torch("mask", mask)
    if not xt.dtype.is_floating_point:
        raise ValueError(f"x must be floating-point, got dtype {xt.dtype}")
    if mt.dtype != torch.bool:
        raise ValueError(f"mask must be a bool array, got dtype {mt.dtype}")
    if mt.shape != xt.shape:
        raise ValueError(f"mask has shape {tuple(mt.shape)} but x has {tuple(xt.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    mt = mt.to(xt.device)
    xd = xt.detach().double()
    sel = xd[mt]
    n = sel.numel()
    if n == 0:
        return _back(torch.zeros_like(xd, dtype=torch.float32), kind)
    if not torch.isfinite(sel).all():
        raise ValueError("x must be finite where mask is True")
    mean = sel.mean()
    var = ((sel - mean) ** 2).sum() / (n - 1) if n > 1 else sel.new_zeros(())
    scale = torch.rsqrt(var + eps) if float(var + eps) > 0 else sel.new_zeros(())
    y = (xd - mean) * scale if shift_mean else xd * scale
    return _back(torch.where(mt, y, 0.0).float(), kind)


def group_advantages(scores, group_ids, *, normalize_std: bool = True, eps: float = 1e-6):
    """Critic-free (GRPO-style) advantages: each score's deviation from its group's mean.

    ``A_i = s_i − mean_{g(i)}``, divided by ``std_{g(i)} + eps`` when ``normalize_std`` (the
    unbiased std, as GRPO implementations use). A singleton group has std 0 and advantage 0;
    a group whose scores are all equal gets 0 as well (never NaN). Broadcast to tokens with
    e.g. ``A[traj_of_token] * action_mask``.

    Args:
        scores: ``[N]`` float episode scores.
        group_ids: ``[N]`` int, episodes with the same id share a prompt (any integers).
        normalize_std: divide by the group std (Dr. GRPO sets it False).
        eps: added to the std before dividing.

    Returns:
        ``[N]`` float32 of ``scores``' kind and device.
    """
    s, kind = _to_torch("scores", scores)
    g, _ = _to_torch("group_ids", group_ids)
    if s.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(s.shape)}")
    if not s.dtype.is_floating_point:
        raise ValueError(f"scores must be floating-point, got dtype {s.dtype}")
    if g.shape != s.shape:
        raise ValueError(f"group_ids has shape {tuple(g.shape)} but scores has {tuple(s.shape)}")
    if g.dtype.is_floating_point or g.dtype == torch.bool or g.is_complex():
        raise ValueError(f"group_ids must hold integers, got dtype {g.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    s = s.detach().double()
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite")
    _, inv = torch.unique(g.to(s.device), return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, inv, torch.ones_like(s))
    mean = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, inv, s) / count
    dev = s - mean[inv]
    if normalize_std:
        ss = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, inv, dev * dev)
        std = torch.sqrt(ss / (count - 1).clamp(min=1))
        denom = std[inv] + eps
        dev = torch.where(denom > 0, dev / torch.where(denom > 0, denom, 1.0), 0.0)
    return _back(dev.float(), kind)
