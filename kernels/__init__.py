"""Triton kernels of atod-fast, installed as ``atod_fast.kernels``.

Kernels import nothing from the rest of the package above them (no trainer, no config):
they take tensors and return tensors.
"""
