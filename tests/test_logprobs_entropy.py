"""fused_logprobs_entropy (``tri``) against full-logit log_softmax (``ref``)."""

import pytest
import torch
from loss_cases import nan_filled_buffers  # noqa: F401  (autouse fixture)

from atod_fast import fused_logprobs_entropy
from atod_fast.ops.losses import chunked

BACKENDS = ["torch", "triton", "triton_fused"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU machine


def case(n, h, v, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale / h**0.5).to(dtype)
    bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return tuple(t.to(DEVICE) for t in (hidden, weight, bias, target, g_lp, g_ent))


def run(hidden, weight, bias, target, g_lp, g_ent, backend, temperature=1.0):
    hidden, weight, bias = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    lp, ent = fused_logprobs_entropy(hidden, weight, target, bias=bias, temperature=temperature, backend=backend)
    ((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
    return [lp, ent, hidden.grad, weight.grad, bias.grad]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "h", "v", "temperature"), [(37, 48, 1000, 1.0), (1, 16, 300, 0.6), (64, 32, 512, 1.3)])
def test_matches_reference_fp32(backend, n, h, v, temperature, monkeypatch):
    budget = 16 * 4 * v  # about 16 rows per chunk: several chunks
    monkeypatch.setattr(chunked, "CPU_BUDGET_BYTES", budget)
    monkeypatch.setattr(chunked, "GPU_BUDGET_BYTES", (budget, budget))
    args = case(n, h, v, seed=n)
    ref = run(*args, "reference", temperature)
    tri = run(*args, backend, temperature)
    for name, t, r in zip(("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias"), tri, ref, strict=True):
        assert t.dtype == r.dtype
        assert rel_err(t, r) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_reference_error(backend):
    args = case(33, 40, 700, dtype=torch.bfloat16, seed=3, scale=3.0)
    exact = run(*[t.double() if t.dtype == torch.bfloat16 else t for t in args], "reference")
    ref = run(*args, "reference")
    tri = run(*args, backend)
    for t, r, e in zip(tri, ref, exact, strict=True):
        assert rel_err(t, e) <= max(2 * rel_err(r, e), 1e-6)


def test_peaked_rows_keep_entropy_accurate():
    # Near one-hot rows: H ≈ 1e-3 next to log-sum-exp ≈ 100; a naive lse − E[z] loses it.
    hidden, weight, bias, target, g_lp, g_ent = case(8, 16, 600, seed=5, scale=60.0)
    ref = run(hidden, weight, bias, target, g_lp, g_ent, "reference")
    for backend in BACKENDS:
        tri = run(hidden, weight, bias, target, g_lp, g_ent, backend)
        assert rel_err(tri[1], ref[1]) < 1e-5


def test_validation_errors():
    hidden, weight, bias, target, _, _ = case(4, 8, 10)
    with pytest.raises(ValueError, match="target_ids must be in"):
        fused_logprobs_entropy(hidden, weight, target + 10)
    with pytest.raises(ValueError, match="weight has H=8 columns but hidden has H=7"):
        fused_logprobs_entropy(hidden[:, :7], weight, target)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs_entropy(hidden, weight, target, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_logprobs_entropy(hidden, weight, target, backend="cuda")
    with pytest.raises(ValueError, match="bias must be"):
        fused_logprobs_entropy(hidden, weight, target, bias=bias[:5])
