"""Temporary plain-PyTorch GAE over packed trajectories until ``atod_fast.gae`` is merged."""

from __future__ import annotations

import torch


def compute_gae(rewards, values, cu_seqlens, action_mask, *, gamma=1.0, lam=0.95, bootstrap_values=None,
                backend="auto"):
    adv = torch.zeros_like(values, dtype=torch.float64)
    r, v = rewards.double(), values.double()
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        pos = [i for i in range(cu[b], cu[b + 1]) if action_mask[i]]
        nxt = float(bootstrap_values[b]) if bootstrap_values is not None else 0.0
        a = 0.0
        for i in reversed(pos):
            delta = r[i] + gamma * nxt - v[i]
            a = delta + gamma * lam * a
            adv[i] = a
            nxt = v[i]
    ret = torch.where(action_mask, adv + v, torch.zeros_like(adv))
    return adv.float(), ret.float()
