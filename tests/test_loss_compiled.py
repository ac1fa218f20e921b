"""The ``torch`` backend's compiled row path (torch.compile on the CPU) against the reference.

Production sends only large float32 CPU problems through it (``MIN_ELEMENTS``); here the
threshold is dropped so the small cases of test_loss_fused take that path, a few configurations
only, since each one compiles (seconds to a minute on a busy 2-core machine).
"""

import pytest
import torch
from loss_cases import nan_filled_buffers  # noqa: F401  (autouse fixture)
from test_loss_fused import CASES, assert_close, make_case, run

from atod_fast.ops.losses import rows_compiled

pytestmark = pytest.mark.skipif(not rows_compiled.compile_enabled(), reason="ATOD_FAST_COMPILE=0")


@pytest.fixture
def compiled_path(monkeypatch):
    monkeypatch.setattr(rows_compiled, "MIN_ELEMENTS", 0)
    calls = []
    real = rows_compiled.compiled_rows

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("atod_fast.ops.losses.chunked.compiled_rows", spy)
    return calls


@pytest.mark.parametrize("name", ["jsd", "dual_clip_temperature", "sparse", "no_teacher", "sampled", "sampled_no_old",
                                  "distill_only"])
def test_compiled_rows_match_reference(compiled_path, name):
    c = CASES[name]
    kw = make_case(**c["case"], seed=list(CASES).index(name))
    ref = run(kw, "reference", 1.5, **c["hp"])
    tri = run(kw, "torch", 1.5, chunk_size=16, **c["hp"])
    assert compiled_path and all(compiled_path), "the compiled path did not run (or failed to compile)"
    assert_close(tri, ref, 1e-5)


def test_compile_failure_falls_back_to_eager(compiled_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(rows_compiled, "_rows_math", broken)
    monkeypatch.setattr(rows_compiled, "_failed", set())
    kw = make_case(seed=2)
    ref = run(kw, "reference", divergence="jsd", kl_coef=0.1)
    tri = run(kw, "torch", divergence="jsd", kl_coef=0.1, chunk_size=16)
    assert compiled_path and not any(compiled_path)
    assert_close(tri, ref, 1e-5)
    assert torch.isfinite(tri[0].loss)


def test_compiled_rows_split_over_threads_match_reference(compiled_path):
    """With 2 threads the compiled loops run OpenMP over each sub-block's rows (a second compiled variant)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        c = CASES["jsd"]
        kw = make_case(**c["case"], seed=7)
        ref = run(kw, "reference", 1.5, **c["hp"])
        tri = run(kw, "torch", 1.5, chunk_size=16, **c["hp"])
    finally:
        torch.set_num_threads(saved)
    assert compiled_path and all(compiled_path)
    assert_close(tri, ref, 1e-5)
