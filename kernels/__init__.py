"""Triton kernels of atod-fast, installed as ``atod_fast.kernels``.

Kernels import nothing from the rest of the package above them (no trainer, no config):
they take tensors and return tensors.
"""

if __name__ == "kernels":
    # Imported under the plain name, this directory is a checkout's root on sys.path (``python -m`` run from it)
    # hiding Hugging Face's ``kernels`` package, which transformers imports whenever it is installed (it is a
    # dependency of recent transformers). Hand the name over to that package when there is one.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what ``import kernels`` returns once this body ends
        _spec.loader.exec_module(_module)
