"""glibc's malloc told to keep large freed blocks for reuse, for training on the CPU.

By default glibc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
``mmap`` and gives it back on ``free``; it also trims the heap's free top. PyTorch's CPU tensors are plain malloc
blocks that come and go with every op, so each large temporary of a step (activations, attention blocks,
gradients) is paid for again in page faults: the kernel maps and zeroes every fresh 4 KiB page. With both
thresholds raised, freed blocks stay in the heap and the next op reuses them. The price is that the process keeps
its peak heap instead of returning it between passes, which a training run reaches again at every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

_log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30
"""Blocks below 1 GiB come from the heap (larger ones, e.g. a big model's weights, still get their own mapping)."""
TRIM_THRESHOLD = 1 << 30
"""Free heap top kept up to 1 GiB before any is returned."""
ENV = "ATOD_FAST_KEEP_FREED"
"""``ATOD_FAST_KEEP_FREED=0`` leaves malloc as it is."""

_done: bool | None = None


def keep_freed_blocks(device: torch.device) -> bool:
    """Raises glibc's mmap and trim thresholds once per process when ``device`` is the CPU; True when they are set.

    False (and nothing changed) on other devices, off Linux, with another C library, when a
    ``MALLOC_*_THRESHOLD_`` environment variable or :data:`ENV` already decided, or when ``mallopt`` refuses.
    """
    global _done
    if device.type != "cpu":
        return False
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "1") == "0":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user's own choice stands
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _done:
        _log.debug("mallopt refused the thresholds; malloc left as it is")
    return _done
