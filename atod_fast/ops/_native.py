"""Optional native (C++) extensions: import them if built, never fail without them.

``ATOD_FAST_NO_EXT=1`` skips the build at install time (see setup.py) and, at run time,
makes every op ignore an extension that was built and use its pure-PyTorch fallback.
"""

from __future__ import annotations

import importlib
import os
import warnings

ENV_NO_EXT = "ATOD_FAST_NO_EXT"

_cache: dict[str, tuple[object | None, str]] = {}
_warned: set[str] = set()


def ext_disabled() -> bool:
    return os.environ.get(ENV_NO_EXT, "").strip().lower() in ("1", "true", "yes")


def load(name: str) -> tuple[object | None, str]:
    """``(module, "")`` for the extension ``atod_fast.<name>``, or ``(None, why_not)``."""
    if ext_disabled():
        return None, f"{ENV_NO_EXT} is set"
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"atod_fast.{name}"), "")
        except ImportError as e:
            _cache[name] = (None, f"the extension is not built ({e})")
    return _cache[name]


def warn_fallback_once(name: str, why: str, what: str) -> None:
    """One warning per extension and process when an op falls back to pure PyTorch."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"atod-fast: C++ extension atod_fast.{name} unavailable ({why}); using the pure-PyTorch {what}. "
        f"Rebuild with a C++17 compiler (`pip install -e .`), or set {ENV_NO_EXT}=1 to choose the fallback.",
        RuntimeWarning,
        stacklevel=4,  # the caller of the public op
    )
