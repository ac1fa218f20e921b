"""Build script: the Python packages plus the optional C++ extensions in csrc/.

The extensions are pybind11 modules over raw buffers (no torch headers), so they build
with any C++17 compiler in seconds. When no compiler is available, or when
ATOD_FAST_NO_EXT=1 is set, the install still succeeds and atod-fast falls back to its
pure-PyTorch implementations at run time (with one warning).
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent

# `kernels/` sits at the top of the repository, but a package named `kernels` exists on
# PyPI: install the folder as `atod_fast.kernels` so it can never shadow (or be shadowed).
PACKAGE_DIR = {"atod_fast": "atod_fast", "atod_fast.kernels": "kernels"}
PACKAGES = ["atod_fast", "atod_fast.kernels"] + [
    "atod_fast." + str(p.relative_to(ROOT / "atod_fast").parent).replace(os.sep, ".")
    for p in sorted((ROOT / "atod_fast").glob("*/**/__init__.py"))
]

# (module name, sources): a module whose sources are not all present is skipped.
EXTENSIONS = [
    ("atod_fast._gae_cpp", ["csrc/gae.cpp"]),
]


def _skip_ext() -> bool:
    return os.environ.get("ATOD_FAST_NO_EXT", "").strip().lower() in ("1", "true", "yes")


class OptionalBuildExt(build_ext):
    """Build each extension if possible; warn instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all, broken toolchain, ...
            self._warn(f"C++ extensions not built ({e}); the pure-PyTorch fallbacks will be used.")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._warn(f"C++ extension {ext.name} not built ({e}); its pure-PyTorch fallback will be used.")

    @staticmethod
    def _warn(msg):
        print(f"WARNING: atod-fast: {msg}", file=sys.stderr)


def _extensions():
    if _skip_ext():
        print("atod-fast: ATOD_FAST_NO_EXT is set, skipping the C++ extensions.", file=sys.stderr)
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: atod-fast: pybind11 not importable, skipping the C++ extensions.", file=sys.stderr)
        return []
    exts = []
    for name, sources in EXTENSIONS:
        if not all((ROOT / s).exists() for s in sources):
            continue
        exts.append(
            Pybind11Extension(
                name,
                sources,
                cxx_std=17,
                extra_compile_args=["-O3", "-pthread"] if os.name != "nt" else ["/O2"],
                extra_link_args=["-pthread"] if os.name != "nt" else [],
            )
        )
    return exts


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
