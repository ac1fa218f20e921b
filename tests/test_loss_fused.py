"""Chunked and fused atod_loss backends (``tri``) against the reference (``ref``)."""

import math

import pytest
import torch
from loss_cases import make_case as _make_case
from loss_cases import nan_filled_buffers  # noqa: F401  (autouse fixture)

from atod_fast import AtodLoss, atod_loss
from atod_fast.ops.losses.api import BACKENDS

# Compiled kernels on a GPU machine, Triton's interpreter (conftest.py) elsewhere.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FUSED = [b for b in ("torch", "triton", "triton_fused") if b in BACKENDS]
FIELDS = ("logprobs", "entropy", "distill", "pg", "kl", "teacher_entropy")
PARAMS = ("student_hidden", "student_weight", "student_bias")


def make_case(drop=(), **kw):
    """loss_cases.make_case on DEVICE, without the inputs named in ``drop`` (optional ones)."""
    return {k: v for k, v in _make_case(device=DEVICE, **kw).items() if k not in drop}


def run(kw, backend, upstream=1.0, **hp):
    """Loss, per-token outputs and grads of ``upstream · loss`` w.r.t. the student's tensors."""
    kw = {k: v.detach().clone().requires_grad_(True) if k in PARAMS else v for k, v in kw.items()}
    out = atod_loss(**kw, backend=backend, **hp)
    (out.loss * upstream).backward()
    return out, {k: kw[k].grad for k in PARAMS if k in kw}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def assert_close(tri, ref, tol, skip=()):
    (o_t, g_t), (o_r, g_r) = tri, ref
    assert o_t.loss.dtype == torch.float32 and o_t.loss.dim() == 0
    errs = {"loss": rel_err(o_t.loss, o_r.loss)}
    errs.update({f: rel_err(getattr(o_t, f), getattr(o_r, f)) for f in FIELDS if f not in skip})
    errs.update({k: rel_err(g_t[k], g_r[k]) for k in g_r})
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    assert torch.equal(o_t.clipped, o_r.clipped)
    for f in FIELDS:
        assert getattr(o_t, f).dtype == torch.float32


CASES = {
    "reverse_kl": dict(case=dict(), hp=dict(divergence="reverse_kl")),
    "forward_kl": dict(case=dict(), hp=dict(divergence="forward_kl", kl_coef=0.1)),
    "jsd": dict(case=dict(), hp=dict(divergence="jsd", jsd_beta=0.3, entropy_coef=0.01)),
    "sparse": dict(case=dict(teacher="sparse", k=6), hp=dict(divergence="forward_kl")),
    "no_teacher": dict(case=dict(teacher="none", bias=False), hp=dict(kl_coef=0.2, entropy_coef=0.05)),
    "ht_ne_h": dict(case=dict(ht=24, teacher_bias=False), hp=dict(divergence="jsd")),
    "dual_clip_temperature": dict(case=dict(logit_scale=4.0), hp=dict(dual_clip=2.0, temperature=0.7, kl_coef=0.1,
                                                                      entropy_coef=0.02, clip_eps_high=0.28)),
    "vocab_size": dict(case=dict(vt=1013), hp=dict(vocab_size=990, divergence="forward_kl")),
    "n1": dict(case=dict(n=1, masked_frac=0.0), hp=dict(divergence="jsd")),
    "normalizer_tensor": dict(case=dict(), hp=dict(normalizer=torch.tensor(50.0), kl_coef=0.1)),
    "normalizer_float": dict(case=dict(ref=False), hp=dict(normalizer=7.5, divergence="reverse_kl")),
    # LOSS-SPEC: the sampled teacher, a teacher given as logits (wider than the vocabulary), optional inputs.
    "sampled": dict(case=dict(teacher="sampled"), hp=dict(divergence="sampled_reverse_kl", kl_coef=0.1, dual_clip=2.0,
                                                          entropy_coef=0.02)),
    "sampled_no_old": dict(case=dict(teacher="sampled", n=23, v=257, drop=("old_logprobs",)),
                           hp=dict(divergence="sampled_reverse_kl", entropy_coef=0.02, temperature=0.9)),
    "sampled_no_ppo": dict(case=dict(teacher="sampled", ref=False, drop=("old_logprobs", "advantages", "lam")),
                           hp=dict(divergence="sampled_reverse_kl")),
    "teacher_logits": dict(case=dict(teacher="logits", logit_scale=2.0), hp=dict(divergence="jsd", jsd_beta=0.2)),
    "logits_reverse_kl_temperature": dict(case=dict(teacher="logits", logit_scale=2.0),
                                          hp=dict(temperature=0.8, kl_coef=0.1)),
    "logits_forward_kl_vocab_size": dict(case=dict(teacher="logits", vt=1013), targets_below=990,
                                         hp=dict(divergence="forward_kl", vocab_size=990)),
    "distill_only": dict(case=dict(teacher="logits", n=19, v=301, drop=("old_logprobs", "advantages", "lam")),
                         hp=dict(divergence="reverse_kl")),
    "no_advantages": dict(case=dict(drop=("advantages", "lam")), hp=dict(divergence="forward_kl", kl_coef=0.1)),
    "no_advantages_with_lam": dict(case=dict(drop=("advantages",)), hp=dict(divergence="jsd", kl_coef=0.1)),
    "no_old_logprobs": dict(case=dict(teacher="sparse", k=6, drop=("old_logprobs",)),
                            hp=dict(divergence="forward_kl", dual_clip=2.0)),
    "small_odd": dict(case=dict(n=5, h=7, v=77, ht=3, masked_frac=0.0), hp=dict(divergence="jsd", entropy_coef=0.1)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", FUSED)
def test_matches_reference_fp32(backend, name):
    c = CASES[name]
    kw = make_case(**c["case"], seed=list(CASES).index(name))
    if "targets_below" in c:
        kw["target_ids"] %= c["targets_below"]
    upstream = float(torch.empty(()).uniform_(0.5, 2.0)) if name != "reverse_kl" else 2.0  # loss * 2 upstream
    ref = run(kw, "reference", upstream, **c["hp"])
    # chunk_size 16 < N = 37: three chunks, the last one partial.
    tri = run(kw, backend, upstream, chunk_size=16, **c["hp"])
    assert_close(tri, ref, 1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_default_chunking_and_clipping_both_ways(backend):
    kw = make_case(n=29, v=777, logit_scale=3.0, seed=5)
    ref = run(kw, "reference", dual_clip=3.0, kl_coef=0.3)
    tri = run(kw, backend, dual_clip=3.0, kl_coef=0.3)
    assert_close(tri, ref, 1e-5)
    live_clipped = ref[0].clipped[kw["loss_mask"]]
    assert live_clipped.any() and not live_clipped.all()  # the case exercises both PPO branches


@pytest.mark.parametrize("backend", FUSED)
def test_masked_rows_garbage_does_not_leak(backend):
    kw = make_case(teacher="sparse", seed=3)
    dead = ~kw["loss_mask"]
    assert dead.any()
    kw["target_ids"][dead] = -100
    kw["teacher_topk_ids"][dead] = -1
    for k in ("advantages", "old_logprobs", "ref_logprobs", "teacher_topk_logprobs"):
        kw[k][dead] = float("nan")
    kw["lam"][dead] = 7.0
    ref = run(kw, "reference", divergence="forward_kl", kl_coef=0.1)
    tri = run(kw, backend, divergence="forward_kl", kl_coef=0.1, chunk_size=8)
    assert_close(tri, ref, 1e-5)
    for f in FIELDS:
        assert (getattr(tri[0], f)[dead] == 0).all()
    assert not tri[0].clipped[dead].any()
    assert (tri[1]["student_hidden"][dead] == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_sparse_teacher_with_minus_inf_entries(backend):
    kw = make_case(teacher="sparse", k=5, seed=11)
    kw["teacher_topk_logprobs"][:, 3:] = -float("inf")
    ref = run(kw, "reference", divergence="forward_kl")
    tri = run(kw, backend, divergence="forward_kl", chunk_size=10)
    assert_close(tri, ref, 1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_all_masked_gives_zero_loss_and_zero_grads(backend):
    kw = make_case(n=9, masked_frac=1.1)
    out, grads = run(kw, backend, divergence="jsd")
    assert out.loss.item() == 0.0
    for g in grads.values():
        assert torch.equal(g, torch.zeros_like(g))
    for f in FIELDS:
        assert (getattr(out, f) == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    kw = make_case(seed=7)
    h = kw["student_hidden"].shape[1]
    kw["student_hidden"] = kw["student_hidden"].t().contiguous().t()  # column-major [N, H]
    wide = torch.randn(kw["student_weight"].shape[0], h + 5, device=DEVICE)
    wide[:, 2:h + 2] = kw["student_weight"]
    kw["student_weight"] = wide[:, 2:h + 2]  # row stride H + 5
    kw["teacher_hidden"] = torch.stack([kw["teacher_hidden"], kw["teacher_hidden"]], 2)[:, :, 1]
    for k in ("advantages", "old_logprobs", "lam", "ref_logprobs"):
        kw[k] = torch.stack([kw[k], torch.zeros_like(kw[k])], 1)[:, 0]  # stride 2
    assert not kw["student_weight"].is_contiguous() and not kw["advantages"].is_contiguous()
    ref = run(kw, "reference", kl_coef=0.1)
    tri = run(kw, backend, kl_coef=0.1, chunk_size=12)
    assert_close(tri, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_half_inputs_within_twice_reference_error(backend, dtype):
    kw = make_case(dtype=dtype, seed=13, logit_scale=3.0)
    hp = dict(divergence="reverse_kl", kl_coef=0.1, entropy_coef=0.01, chunk_size=16)
    kw64 = {k: v.double() if v.dtype == dtype else v for k, v in kw.items()}
    exact = run(kw64, "reference", **{k: v for k, v in hp.items() if k != "chunk_size"})
    ref = run(kw, "reference", **{k: v for k, v in hp.items() if k != "chunk_size"})
    tri = run(kw, backend, **hp)
    for g in tri[1].values():
        assert g.dtype == dtype
    pairs = [("loss", tri[0].loss, ref[0].loss, exact[0].loss)]
    pairs += [(f, getattr(tri[0], f), getattr(ref[0], f), getattr(exact[0], f)) for f in FIELDS]
    pairs += [(k, tri[1][k], ref[1][k], exact[1][k]) for k in exact[1]]
    for name, t, r, e in pairs:
        err_tri, err_ref = rel_err(t, e), rel_err(r, e)
        # A floor at float32 rounding: outputs computed in float32 by both differ from float64 by ~1e-7.
        assert err_tri <= max(2 * err_ref, 1e-6), f"{name}: {err_tri:.2e} vs reference {err_ref:.2e}"


def test_torch_backend_float64_matches_reference_tightly():
    kw = make_case(dtype=torch.float64, seed=17)
    hp = dict(divergence="jsd", kl_coef=0.1, entropy_coef=0.01, dual_clip=2.5)
    ref = run(kw, "reference", **hp)
    tri = run(kw, "torch", chunk_size=10, **hp)
    assert tri[0].loss.dtype == torch.float64
    for k in ref[1]:
        assert rel_err(tri[1][k], ref[1][k]) < 1e-12
    assert abs(tri[0].loss.item() - ref[0].loss.item()) < 1e-12 * max(1.0, abs(ref[0].loss.item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_teacher_logits_layouts_and_dtypes(backend, dtype):
    # Column-major logits in the model's dtype; every row live (the fused host then reads them in place)
    # and some rows masked (it gathers the live ones).
    for masked_frac, seed in ((0.0, 43), (0.3, 44)):
        kw = make_case(n=19, v=333, teacher="logits", masked_frac=masked_frac, seed=seed, logit_scale=3.0)
        kw["teacher_logits"] = kw["teacher_logits"].to(dtype).t().contiguous().t()
        assert kw["teacher_logits"].stride(1) != 1
        hp = dict(divergence="jsd", jsd_beta=0.4, temperature=0.9, kl_coef=0.1)
        ref = run(kw, "reference", **hp)
        tri = run(kw, backend, chunk_size=7, **hp)
        assert_close(tri, ref, 1e-5)


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "torch"])
@pytest.mark.parametrize("beta, same", [(0.0, "forward_kl"), (1, "reverse_kl")])
def test_jsd_beta_limits_are_the_kls_exactly(backend, beta, same):
    # β 0 / 1 reach the kernels as the KL itself, with β's (infinite) log constants unused.
    kw = make_case(n=13, v=301, seed=47, logit_scale=2.0)
    got = run(kw, backend, divergence="jsd", jsd_beta=beta, chunk_size=8)
    want = run(kw, backend, divergence=same, chunk_size=8)
    for f in ("loss", *FIELDS):
        assert torch.equal(getattr(got[0], f), getattr(want[0], f)), f
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k])


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_forward_matches(backend):
    kw = make_case(seed=19)
    with torch.no_grad():
        ref = atod_loss(**kw, backend="reference", divergence="jsd")
        tri = atod_loss(**kw, backend=backend, divergence="jsd", chunk_size=16)
    assert rel_err(tri.loss, ref.loss) < 1e-5
    for f in FIELDS:
        assert rel_err(getattr(tri, f), getattr(ref, f)) < 1e-5


def test_auto_backend_and_module():
    kw = make_case(seed=23)
    ref = run(kw, "reference", kl_coef=0.1)
    auto = run(kw, "auto", kl_coef=0.1)
    assert_close(auto, ref, 1e-5)
    mod = AtodLoss(kl_coef=0.1, backend="torch", chunk_size=8)
    out = mod(**kw)
    assert rel_err(out.loss, ref[0].loss) < 1e-5
    assert "kl_coef=0.1" in repr(mod)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        AtodLoss(kl_coeff=0.1)
    with pytest.raises(ValueError, match="fixed at AtodLoss construction"):
        mod(**kw, kl_coef=0.2)
    with pytest.raises(ValueError, match="backend must be one of"):
        atod_loss(**kw, backend="cuda")


def test_loss_is_finite_for_peaked_logits():
    # Large logits exercise the online max rescaling (e^(m_old − m_new) across tiles).
    kw = make_case(n=8, v=700, logit_scale=60.0, seed=29, ref=False)
    ref = run(kw, "reference", divergence="reverse_kl")
    # The teacher's entropies here run from 0.4 down to 0: float32 alone is ~2e-5 off in relative norm
    # (the float32 reference too), so they are held to the float64 definition, within twice the reference's error.
    exact = run({k: v.double() if v.is_floating_point() else v for k, v in kw.items()}, "reference",
                divergence="reverse_kl")[0].teacher_entropy
    ref_err = rel_err(ref[0].teacher_entropy, exact)
    for backend in FUSED:
        out, grads = run(kw, backend, chunk_size=4, divergence="reverse_kl")
        assert math.isfinite(out.loss.item()) and all(torch.isfinite(g).all() for g in grads.values())
        assert_close((out, grads), ref, 1e-5, skip=("teacher_entropy",))
        assert rel_err(out.teacher_entropy, exact) <= max(2 * ref_err, 1e-6), backend


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in bytes) any ATen op returns while active, including the
    byte views through which Triton's interpreter copies kernel arguments."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", FUSED)
def test_never_allocates_n_by_v(backend):
    n, h, v, chunk = 96, 16, 512, 32
    kw = make_case(n=n, h=h, v=v, masked_frac=0.0, seed=31)
    kw = {k: t.requires_grad_(True) if k in PARAMS else t for k, t in kw.items()}
    with _LargestTensor() as seen:
        atod_loss(**kw, backend=backend, chunk_size=chunk, divergence="jsd").loss.backward()
    # float32 head gradient V×H, a chunk of logits chunk×V (chunked backends); never N×V.
    allowed = 4 * max(v * h, chunk * v if backend != "triton_fused" else 0)
    assert seen.largest <= allowed < 4 * n * v, f"{backend}: a {seen.largest}-byte tensor (N×V: {4 * n * v} bytes)"


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "torch"])
def test_float64_inputs_run_in_float32(backend):
    kw = make_case(dtype=torch.float64, seed=37)
    ref = run(kw, "reference", divergence="forward_kl", kl_coef=0.1)
    tri = run(kw, backend, divergence="forward_kl", kl_coef=0.1, chunk_size=16)
    assert all(g.dtype == torch.float64 for g in tri[1].values())
    assert_close(tri, ref, 1e-5)  # float32 outputs, within float32 accuracy of the float64 definition


def test_backward_twice_with_retained_graph():
    kw = make_case(seed=41)
    kw = {k: t.requires_grad_(True) if k in PARAMS else t for k, t in kw.items()}
    out = atod_loss(**kw, backend="torch", chunk_size=16)
    out.loss.backward(retain_graph=True)
    first = kw["student_weight"].grad.clone()
    out.loss.backward()
    assert torch.allclose(kw["student_weight"].grad, 2 * first, rtol=1e-6, atol=0)


def test_scaled_copy_in_row_blocks():
    from atod_fast.ops.losses.chunked import scaled_copy

    src = torch.randn(37, 5)
    dst = torch.full((40, 5), float("nan"), dtype=torch.bfloat16)
    dst[37:] = 0
    scaled_copy(dst, src, torch.tensor(1.5), block_bytes=3 * 5 * 4)  # 3 rows per block: 13 blocks
    assert torch.equal(dst[:37], (src * 1.5).bfloat16()) and (dst[37:] == 0).all()
