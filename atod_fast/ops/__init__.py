"""Ops to drop into any RLHF stack: the fused ATOD loss, packed multi-turn GAE and the λ schedule.

Nothing here imports the trainer; the Triton kernels live in ``atod_fast.kernels`` and the C++
extension in ``atod_fast._gae_cpp`` (both optional at run time).
"""
