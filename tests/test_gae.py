"""compute_gae: every backend against the plain-Python recurrence, identities, and every error."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from gae_cases import random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atod_fast import compute_gae
from atod_fast.ops import _native
from atod_fast.ops.gae import gae_reference


def _cpp_available():
    return _native.load("_gae_cpp")[0] is not None


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not _cpp_available(), reason="C++ extension not built/disabled")),
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_available(), reason="triton not installed")),
]


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _interpreted(backend):
    """The Triton interpreter scans element by element in Python: keep its shapes small."""
    return backend == "triton" and _device(backend) == "cpu"


def _run(backend, r, v, cu, m, **kw):
    dev = _device(backend)
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dev)  # noqa: E731
    boot = kw.pop("bootstrap_values", None)
    if boot is not None:
        boot = t(boot)
    adv, ret = compute_gae(t(r), t(v), t(cu), t(m), bootstrap_values=boot, backend=backend, **kw)
    assert adv.dtype == ret.dtype == torch.float32 and adv.device.type == dev
    return adv.cpu().double().numpy(), ret.cpu().double().numpy()


def _assert_close(tri, ref, rtol=1e-5):
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(np.abs(ref).max(initial=0.0), 1e-30)
    err = np.abs(tri - ref).max(initial=0.0)
    assert err <= rtol * scale, f"max error {err:.3e} vs reference scale {scale:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(0, 70), min_size=0, max_size=6),
    gamma=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    lam=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    bootstrap=st.booleans(),
    sparse=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(backend, lengths, gamma, lam, bootstrap, sparse, seed):
    rng = np.random.default_rng(seed)
    r, v, cu, m = random_batch(rng, lengths, sparse_rewards=sparse)
    boot = rng.standard_normal(len(lengths)).astype(np.float32) if bootstrap else None
    ref_a, ref_r = gae_reference(r.tolist(), v.tolist(), cu.tolist(), m.tolist(), gamma=gamma, lam=lam,
                                 bootstrap_values=None if boot is None else boot.tolist())
    # outputs pre-filled nowhere: the backends allocate; zeros off the mask are checked exactly below
    tri_a, tri_r = _run(backend, r, v, cu, m, gamma=gamma, lam=lam, bootstrap_values=boot)
    _assert_close(tri_a, ref_a)
    _assert_close(tri_r, ref_r)
    assert (tri_a[~m] == 0).all() and (tri_r[~m] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.5, 0.3), (1.0, 0.0), (0.0, 1.0)])
def test_long_trajectories_match_reference(backend, gamma, lam):
    """Trajectories long enough for several blocks and levels of the blocked backends."""
    rng = np.random.default_rng(11)
    lengths = [900, 0, 130, 450, 1] if _interpreted(backend) else [9000, 0, 130, 4500, 1]
    r, v, cu, m = random_batch(rng, lengths, sparse_rewards=False)
    boot = rng.standard_normal(len(lengths))
    ref_a, ref_r = gae_reference(r.tolist(), v.tolist(), cu.tolist(), m.tolist(), gamma=gamma, lam=lam,
                                 bootstrap_values=boot.tolist())
    tri_a, tri_r = _run(backend, r, v, cu, m, gamma=gamma, lam=lam, bootstrap_values=boot)
    _assert_close(tri_a, ref_a)
    _assert_close(tri_r, ref_r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 37, 1000])
def test_all_actions_equals_textbook_gae(backend, T):
    rng = np.random.default_rng(T)
    r = rng.standard_normal(T).astype(np.float32)
    v = rng.standard_normal(T).astype(np.float32)
    gamma, lam = 0.99, 0.95
    # textbook single-sequence GAE (as in the PPO paper), terminal episode
    adv = np.zeros(T)
    last = 0.0
    for t in reversed(range(T)):
        nv = float(v[t + 1]) if t + 1 < T else 0.0
        last = float(r[t]) + gamma * nv - float(v[t]) + gamma * lam * last
        adv[t] = last
    tri_a, tri_r = _run(backend, r, v, np.array([0, T]), np.ones(T, dtype=bool), gamma=gamma, lam=lam)
    _assert_close(tri_a, adv)
    _assert_close(tri_r, adv + v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_gamma_lambda_one_is_reward_to_go_minus_value(backend, bootstrap):
    rng = np.random.default_rng(1)
    lengths = [0, 120, 5, 300, 64]
    r, v, cu, m = random_batch(rng, lengths, sparse_rewards=False)
    boot = rng.standard_normal(len(lengths)).astype(np.float32) if bootstrap else None
    expect = np.zeros(len(r))
    for b in range(len(lengths)):
        s, e = cu[b], cu[b + 1]
        seg = np.where(m[s:e], r[s:e], 0.0).astype(np.float64)
        togo = np.cumsum(seg[::-1])[::-1] + (float(boot[b]) if bootstrap else 0.0)
        expect[s:e] = np.where(m[s:e], togo - v[s:e], 0.0)
    tri_a, tri_r = _run(backend, r, v, cu, m, gamma=1.0, lam=1.0, bootstrap_values=boot)
    _assert_close(tri_a, expect)
    _assert_close(tri_r, np.where(m, expect + v, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_trajectory_keeps_float32_rounding(backend):
    """32k tokens with γ = λ = 1: every output within 2 float32 ulps of the float64 answer."""
    T = 2048 if _interpreted(backend) else 32768
    rng = np.random.default_rng(7)
    m = rng.random(T) < 0.5
    r = np.where(m, rng.standard_normal(T), 0.0).astype(np.float32)
    v = (rng.standard_normal(T) + 3.0).astype(np.float32)
    togo = np.cumsum(r[::-1].astype(np.float64))[::-1]
    expect = np.where(m, togo - v, 0.0)
    tri_a, _ = _run(backend, r, v, np.array([0, T]), m, gamma=1.0, lam=1.0)
    ulp = np.spacing(np.abs(expect).astype(np.float32)).astype(np.float64)
    assert (np.abs(tri_a - expect) <= 2 * ulp + 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_and_trajectories_without_actions(backend):
    z = np.zeros(0, dtype=np.float32)
    a, ret = _run(backend, z, z, np.array([0]), np.zeros(0, dtype=bool))
    assert a.shape == ret.shape == (0,)
    a, ret = _run(backend, z, z, np.array([0, 0, 0]), np.zeros(0, dtype=bool), bootstrap_values=np.ones(2))
    assert a.shape == (0,)
    r, v = np.zeros(6, np.float32), np.arange(6, dtype=np.float32)
    a, ret = _run(backend, r, v, np.array([0, 4, 4, 6]), np.zeros(6, dtype=bool), bootstrap_values=np.ones(3))
    assert (a == 0).all() and (ret == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_observation_tokens_are_skipped(backend):
    # actions at 0 and 3; the observation tokens 1, 2 cost no discount and their values are ignored
    r = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    v = np.array([0.5, 100.0, -100.0, 0.25], np.float32)
    m = np.array([True, False, False, True])
    g, l = 0.9, 0.8
    a3 = 1.0 - 0.25
    a0 = (0.0 + g * 0.25 - 0.5) + g * l * a3
    a, ret = _run(backend, r, v, np.array([0, 4]), m, gamma=g, lam=l)
    np.testing.assert_allclose(a, [a0, 0, 0, a3], rtol=1e-6)
    np.testing.assert_allclose(ret, [a0 + 0.5, 0, 0, a3 + 0.25], rtol=1e-6)


def test_numpy_in_numpy_out_and_dtypes():
    rng = np.random.default_rng(3)
    r, v, cu, m = random_batch(rng, [10, 0, 25])
    a, ret = compute_gae(r, v, cu, m, gamma=0.9, lam=0.9, backend="torch")
    assert isinstance(a, np.ndarray) and isinstance(ret, np.ndarray) and a.dtype == ret.dtype == np.float32
    ref_a, _ = gae_reference(r.tolist(), v.tolist(), cu.tolist(), m.tolist(), gamma=0.9, lam=0.9)
    _assert_close(a.astype(np.float64), ref_a)
    for backend in ["auto", "torch"] + (["cpp"] if _cpp_available() else []):
        a2, _ = compute_gae(r.astype(np.float64), v.astype(np.float64), cu.tolist(), m, gamma=0.9, lam=0.9,
                            backend=backend)
        _assert_close(a2.astype(np.float64), ref_a)
        a3, _ = compute_gae(torch.from_numpy(r).bfloat16(), torch.from_numpy(v).half(), torch.from_numpy(cu).int(),
                            torch.from_numpy(m), gamma=0.9, lam=0.9, backend=backend)
        assert isinstance(a3, torch.Tensor) and a3.dtype == torch.float32


def test_public_signature():
    import inspect

    params = inspect.signature(compute_gae).parameters
    assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == [
        "rewards", "values", "cu_seqlens", "action_mask"]
    assert {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == dict(
        gamma=1.0, lam=0.95, bootstrap_values=None, backend="auto")


def test_outputs_do_not_require_grad():
    v = torch.randn(5, requires_grad=True)
    a, ret = compute_gae(torch.zeros(5), v, torch.tensor([0, 5]), torch.ones(5, dtype=torch.bool), backend="torch")
    assert not a.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------------------------------- errors


def _good():
    r = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0])
    v = torch.zeros(5)
    m = torch.tensor([True, True, False, True, True])
    return r, v, torch.tensor([0, 2, 5]), m


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_on_observation_token_is_an_error(backend):
    r, v, cu, m = _good()
    r[2] = 0.5
    with pytest.raises(ValueError, match=r"rewards\[2\].*non-action.*trajectory 1.*last action token of its turn"):
        _run(backend, r.numpy(), v.numpy(), cu.numpy(), m.numpy())


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rewards", "values"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_is_an_error(backend, name, bad):
    r, v, cu, m = _good()
    (r if name == "rewards" else v)[3] = bad
    with pytest.raises(ValueError, match=rf"{name} must be finite.*{name}\[3\].*trajectory 1"):
        _run(backend, r.numpy(), v.numpy(), cu.numpy(), m.numpy())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(values=torch.zeros(4)), r"values has 4 tokens but rewards has T = 5"),
        (dict(action_mask=torch.ones(6, dtype=torch.bool)), r"action_mask has 6 tokens"),
        (dict(action_mask=torch.ones(5)), r"action_mask must be a bool array"),
        (dict(rewards=torch.zeros(5, dtype=torch.long)), r"rewards must be a floating-point"),
        (dict(rewards=torch.zeros(5, 1)), r"rewards must be 1-D"),
        (dict(rewards=[0.0] * 5), r"rewards must be a torch.Tensor or a numpy.ndarray"),
        (dict(values=np.zeros(5, np.float32)), r"must all be torch tensors or all numpy arrays"),
        (dict(cu_seqlens=torch.tensor([1, 2, 5])), r"cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), r"non-decreasing.*cu_seqlens\[1\] = 3 > cu_seqlens\[2\] = 2"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4])), r"cu_seqlens must end at T = 5"),
        (dict(cu_seqlens=torch.tensor([0.0, 5.0])), r"cu_seqlens must hold integers"),
        (dict(cu_seqlens=torch.zeros(0, dtype=torch.long)), r"cu_seqlens must be 1-D \[B\+1\]"),
        (dict(gamma=1.5), r"gamma must lie in \[0, 1\]"),
        (dict(gamma=-0.1), r"gamma must lie in \[0, 1\]"),
        (dict(lam=float("nan")), r"lam must lie in \[0, 1\]"),
        (dict(lam="x"), r"lam must be a number"),
        (dict(bootstrap_values=torch.zeros(3)), r"bootstrap_values must be 1-D \[B\] with B = 2"),
        (dict(bootstrap_values=torch.tensor([0.0, float("inf")])), r"bootstrap_values must be finite.*\[1\]"),
        (dict(backend="cuda"), r"backend must be one of"),
    ],
)
def test_argument_errors(change, match):
    r, v, cu, m = _good()
    kw = dict(rewards=r, values=v, cu_seqlens=cu, action_mask=m)
    kw.update(change)
    args = [kw.pop(k) for k in ("rewards", "values", "cu_seqlens", "action_mask")]
    with pytest.raises(ValueError, match=match):
        compute_gae(*args, **kw)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    r, v, cu, m = _good()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        compute_gae(r, v, cu, m, backend="triton")


def test_forced_fallback_warns_once_and_matches():
    """ATOD_FAST_NO_EXT=1: auto picks the torch fallback, warns exactly once, explicit cpp refuses."""
    code = textwrap.dedent("""
        import warnings, numpy as np, torch
        from atod_fast import compute_gae
        from atod_fast.ops.gae import gae_reference
        from gae_cases import random_batch
        r, v, cu, m = random_batch(np.random.default_rng(0), [30, 0, 50])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a, _ = compute_gae(r, v, cu, m, gamma=0.9, lam=0.7)
            compute_gae(torch.from_numpy(r), torch.from_numpy(v), cu, torch.from_numpy(m))
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and "ATOD_FAST_NO_EXT is set" in msgs[0], msgs
        ref, _ = gae_reference(r.tolist(), v.tolist(), cu.tolist(), m.tolist(), gamma=0.9, lam=0.7)
        assert np.abs(a - np.array(ref)).max() <= 1e-5 * np.abs(ref).max()
        try:
            compute_gae(r, v, cu, m, backend="cpp")
        except RuntimeError as e:
            assert "ATOD_FAST_NO_EXT" in str(e)
        else:
            raise AssertionError("backend='cpp' ran with ATOD_FAST_NO_EXT=1")
        print("ok")
    """)
    env = dict(os.environ, ATOD_FAST_NO_EXT="1")
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
