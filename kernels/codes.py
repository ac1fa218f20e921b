"""Names and codes shared by the kernels and the host code that calls them.

Plain Python (no Triton import), so ``atod_fast.ops`` can import it on machines without Triton.
"""

OUT_FIELDS = ("loss", "logprobs", "entropy", "distill", "pg", "kl", "clipped", "teacher_entropy")
"""Per-row outputs of the chunked loss, in the order of its ``[8, R]`` output's first axis."""
TEACHER_CODES = {"none": 0, "dense": 1, "sparse": 2, "sampled": 3}
"""Teacher kind -> the ``TEACHER`` constexpr of the kernels."""
DIV_CODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
"""Divergence -> the ``DIV`` constexpr of the kernels."""
