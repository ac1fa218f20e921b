"""Whether the Triton backends can run here, for the loss, the log-prob op and GAE alike."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (Linux x86-64 wheels; absent on macOS). Imported only when asked."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_triton_backend(backend: str, device: torch.device) -> None:
    """A ValueError naming ``backend`` when its Triton kernels cannot run on ``device``.

    Triton compiles for GPUs; CPU tensors run only through its interpreter (``TRITON_INTERPRET=1``),
    which is read when Triton is first imported. Without either, Triton itself fails with "0 active
    drivers", which says nothing about what to change.
    """
    if not triton_available():
        raise ValueError(f"backend={backend!r} needs the triton package, which is not installed; "
                         "use backend='torch' (or 'auto')")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}: Triton kernels run on "
                         "a GPU. Move the inputs to CUDA, set TRITON_INTERPRET=1 (the slow interpreter, for tests) "
                         "or use backend='torch' (or 'auto')")
