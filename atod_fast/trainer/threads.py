"""torch's CPU threads per kind of work: batched passes on the cores, token-by-token decoding of tiny models on one.

``cpu_threads`` set: everything runs on that many. ``cpu_threads=null``: batched passes (behaviour statistics,
scoring, updates, and a rollout's prefill of each turn's new tokens) take the process default; the token-by-token
steps of decoding (rollouts, evaluation) of the tiny built-in models take 1 thread, because a decode step's ops are
too small to split and, on a loaded machine, threads waiting on each other cost up to 3× the rollout time.
"""

from __future__ import annotations

import contextlib

import torch

from .config import BUILTIN, TrainConfig

_PROCESS_THREADS = torch.get_num_threads()
"""torch's thread count before any run set it (OMP_NUM_THREADS, else the cores): what ``cpu_threads=null`` uses."""


def batch_threads(cfg: TrainConfig) -> int:
    """torch's threads for this run's batched passes."""
    return _PROCESS_THREADS if cfg.cpu_threads is None else cfg.cpu_threads


def set_cpu_threads(cfg: TrainConfig) -> None:
    """Sets torch's threads for the batched passes of this run."""
    torch.set_num_threads(batch_threads(cfg))


def decode_threads(cfg: TrainConfig) -> int:
    """torch's threads for this run's token-by-token decoding."""
    if cfg.cpu_threads is not None:
        return cfg.cpu_threads
    tiny = cfg.model.student == BUILTIN and cfg.model.teacher in (BUILTIN, None)
    return 1 if tiny else _PROCESS_THREADS


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after."""
    saved = torch.get_num_threads()
    if n == saved:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
