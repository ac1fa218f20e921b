"""``compute_gae``: GAE over packed multi-turn trajectories, whatever the backend."""

from __future__ import annotations

import numpy as np
import torch

from .. import _native
from .._triton import check_triton_backend, triton_available
from .inputs import GaeInputs, check_token_values, validate
from .torch_impl import gae_torch

BACKENDS = ("auto", "cpp", "triton", "torch")
_EXT = "_gae_cpp"


def _gae_cpp(x: GaeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    ext, why = _native.load(_EXT)
    if ext is None:
        raise RuntimeError(f"backend='cpp' is unavailable: {why}")
    if x.rewards.device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU inputs, got tensors on {x.rewards.device}; "
                         "use backend='triton' or 'auto' for CUDA tensors")
    # the extension reads float32/float64 buffers; half types are widened once here
    r = x.rewards if x.rewards.dtype in (torch.float32, torch.float64) else x.rewards.float()
    v = x.values if x.values.dtype in (torch.float32, torch.float64) else x.values.float()
    T = x.num_tokens
    # one thread per torch thread (torch.set_num_threads / OMP_NUM_THREADS); small inputs use fewer
    adv = torch.empty(T, dtype=torch.float32)
    ret = torch.empty(T, dtype=torch.float32)
    boot = None if x.bootstrap is None else x.bootstrap.numpy()
    ok = ext.gae(r.numpy(), v.numpy(), x.action_mask.numpy(), x.cu_host, boot, adv.numpy(), ret.numpy(),
                 x.gamma, x.lam, torch.get_num_threads())
    if not ok:
        check_token_values(x)  # raises the error for the first bad token
        raise AssertionError("_gae_cpp flagged a bad token but the values check found none")
    return adv, ret


def _gae_triton(x: GaeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_backend("triton", x.rewards.device)
    from atod_fast.kernels.gae import gae_triton

    # the interpreter runs each block in numpy: small blocks keep CPU tests fast
    block = 512 if x.rewards.device.type == "cuda" else 64
    adv, ret, bad = gae_triton(x.rewards, x.values, x.action_mask, x.cu_seqlens, x.bootstrap, x.gamma, x.lam,
                               block=block)
    if bool(bad.any()):  # the one host sync of this backend
        check_token_values(x)
        raise AssertionError("the GAE kernel flagged a bad token but the values check found none")
    return adv, ret


_IMPLS = {"cpp": _gae_cpp, "triton": _gae_triton, "torch": gae_torch}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    ext, why = _native.load(_EXT)
    if ext is None:
        _native.warn_fallback_once(_EXT, why, "GAE (backend='torch')")
        return "torch"
    return "cpp"


def compute_gae(
    rewards,
    values,
    cu_seqlens,
    action_mask,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap_values=None,
    backend: str = "auto",
):
    """Generalized advantage estimation over packed multi-turn trajectories.

    Trajectory b occupies tokens ``[cu_seqlens[b], cu_seqlens[b+1])`` (flash-attn's varlen
    layout). Only action tokens (``action_mask`` True: what the agent generated) take part;
    observation/prompt/tool tokens cost no discount, carry no value and get 0 in both
    outputs. With a_0 < … < a_{m−1} the action positions of trajectory b::

        next_k = values[a_{k+1}] for k < m−1;  bootstrap_values[b] (truncated) or 0 (terminal) for k = m−1
        δ_k = rewards[a_k] + γ·next_k − values[a_k]
        A_k = δ_k + γλ·A_{k+1},   returns_k = A_k + values[a_k]

    Accumulation is in float64. A reward on a non-action token is an error (it would be
    lost): put it on the last action token of its turn, e.g. with ``turn_rewards_to_tokens``.

    Args:
        rewards: ``[T]`` float per-token rewards (0 where there is none).
        values: ``[T]`` float value-head outputs.
        cu_seqlens: ``[B+1]`` int offsets, ``0 = cu[0] ≤ … ≤ cu[B] = T``; empty trajectories are fine.
        action_mask: ``[T]`` bool, True on the agent's tokens.
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].
        bootstrap_values: ``[B]`` optional values after the last token of truncated episodes.
        backend: ``"auto"`` (``"cpp"`` for CPU inputs, ``"triton"`` for CUDA), ``"cpp"``
            (C++ extension, ``torch.get_num_threads()`` threads), ``"triton"`` or ``"torch"``
            (vectorized pure PyTorch; CPU or CUDA). Without the extension, or with
            ``ATOD_FAST_NO_EXT=1``, ``"auto"`` uses ``"torch"`` on the CPU (one warning).

    Inputs are all torch tensors (CPU or CUDA) or all numpy arrays; ``cu_seqlens`` and
    ``bootstrap_values`` may also be sequences. Gradients never flow through the outputs.

    Returns:
        ``(advantages, returns)``, each ``[T]`` float32, of the inputs' kind and device.
    """
    x = validate(rewards, values, cu_seqlens, action_mask, gamma=gamma, lam=lam, bootstrap_values=bootstrap_values)
    which = _resolve_backend(backend, x.rewards.device)
    with torch.no_grad():
        adv, ret = _IMPLS[which](x)
    if x.kind == "numpy":
        return np.asarray(adv.cpu().numpy()), np.asarray(ret.cpu().numpy())
    return adv, ret
