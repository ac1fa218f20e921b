"""The distillation inputs of atod_loss (LOSS-SPEC): teacher_entropy, the sampled teacher
(``sampled_reverse_kl``), ``teacher_logits``, the optional PPO inputs, integer masks and jsd_beta 0/1.

The reference backend against float64 definitions written out here, hand computations and finite
differences; the ``torch`` backend against the reference (the Triton backends: test_loss_fused.py).
"""

import math

import pytest
import torch
from loss_cases import make_case, nan_filled_buffers  # noqa: F401  (nan_filled_buffers: autouse fixture)
from test_loss_reference import LN_04, Z_S, Z_T, eye_inputs

from atod_fast import atod_loss

LN = math.log
PARAMS = ("student_hidden", "student_weight", "student_bias")


def run(kw, backend, **hp):
    """(output, grads of the loss w.r.t. the student's tensors)."""
    kw = {k: v.detach().clone().requires_grad_(True) if k in PARAMS else v for k, v in kw.items()}
    out = atod_loss(**kw, backend=backend, **hp)
    out.loss.backward()
    return out, {k: kw[k].grad for k in PARAMS if k in kw}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def sampled_eye(teacher_logprob, **kw):
    """eye_inputs with a sampled teacher: the teacher's log-prob of the target."""
    kw = eye_inputs(Z_S, **kw)
    kw["teacher_logprobs"] = torch.tensor([teacher_logprob], dtype=torch.float64)
    return kw


def student_logp64(kw, temperature=1.0):
    h, w, b = (kw[k].double() for k in PARAMS)
    return torch.log_softmax((h @ w.t() + b) / temperature, -1)


# --- hand computations (V = 3, identity heads; p_s = [1/4, 1/2, 1/4], p_t uniform) ----------

def test_hand_computed_teacher_entropy():
    assert atod_loss(**eye_inputs(Z_S, Z_T)).teacher_entropy.item() == pytest.approx(LN(3.0), rel=1e-12)
    kw = eye_inputs(Z_S)
    kw["teacher_topk_ids"] = torch.tensor([[1, 0]])
    kw["teacher_topk_logprobs"] = torch.tensor([[LN(0.6), LN(0.2)]], dtype=torch.float64)
    want = -(0.75 * LN(0.75) + 0.25 * LN(0.25))  # renormalized p̂ = [0.75, 0.25]
    assert atod_loss(**kw, divergence="forward_kl").teacher_entropy.item() == pytest.approx(want, rel=1e-12)
    kw = sampled_eye(LN(0.25))
    assert atod_loss(**kw, divergence="sampled_reverse_kl").teacher_entropy.item() == pytest.approx(LN(4.0))
    assert atod_loss(**eye_inputs(Z_S)).teacher_entropy.item() == 0.0


def test_hand_computed_sampled_reverse_kl():
    # Target 1: lp = ln 1/2, t = ln 1/4. Without old log-probs D = lp − t = ln 2 (ratio 1).
    kw = sampled_eye(LN(0.25), lam=1.0)
    del kw["old_logprobs"], kw["advantages"]
    out = atod_loss(**kw, divergence="sampled_reverse_kl")
    assert out.distill.item() == pytest.approx(LN(2.0), rel=1e-12)
    assert out.loss.item() == pytest.approx(LN(2.0), rel=1e-12)
    # With o = ln 0.4: D = −(ln 0.25 − ln 0.4)·(0.5 / 0.4), mixed by λ = 0.3 with the clipped PPO term −2.4.
    kw = sampled_eye(LN(0.25))
    out = atod_loss(**kw, divergence="sampled_reverse_kl")
    d = -(LN(0.25) - LN_04) * 1.25
    assert out.distill.item() == pytest.approx(d, rel=1e-12)
    assert out.loss.item() == pytest.approx(0.3 * d + 0.7 * -2.4, rel=1e-12)


def test_hand_computed_sampled_reverse_kl_gradient():
    # dℓ/dz = λ·D·(onehot − p) through lp only (λ = 1, no PPO): z = [0, ln 2, 0], target 1.
    kw = sampled_eye(LN(0.25), lam=1.0)
    del kw["old_logprobs"], kw["advantages"]
    kw["student_hidden"].requires_grad_(True)
    atod_loss(**kw, divergence="sampled_reverse_kl").loss.backward()
    want = LN(2.0) * torch.tensor([[-0.25, 0.5, -0.25]], dtype=torch.float64)
    torch.testing.assert_close(kw["student_hidden"].grad, want, rtol=1e-12, atol=1e-14)


# --- the reference against float64 definitions ---------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "logits", "sparse", "sampled", "none"])
def test_teacher_entropy_matches_float64(teacher):
    kw = make_case(teacher=teacher, k=5, seed=3, logit_scale=2.0)
    div = {"sparse": "forward_kl", "sampled": "sampled_reverse_kl"}.get(teacher, "jsd")
    out = atod_loss(**kw, backend="reference", divergence=div, temperature=0.8)
    live = kw["loss_mask"]
    v = kw["student_weight"].shape[0]
    if teacher == "dense":
        z = kw["teacher_hidden"].double() @ kw["teacher_weight"].double().t() + kw["teacher_bias"].double()
    elif teacher == "logits":
        z = kw["teacher_logits"].double()[:, :v]
    if teacher in ("dense", "logits"):
        lp = torch.log_softmax(z / 0.8, -1)
        want = -(lp.exp() * lp).sum(-1)
    elif teacher == "sparse":
        lp = torch.log_softmax(kw["teacher_topk_logprobs"].double(), -1)
        want = -(lp.exp() * lp).sum(-1)
    elif teacher == "sampled":
        want = -kw["teacher_logprobs"].double()
    else:
        want = torch.zeros(live.shape[0], dtype=torch.float64)
    want = torch.where(live, want, 0.0)
    assert out.teacher_entropy.dtype == torch.float32 and not out.teacher_entropy.requires_grad
    assert rel_err(out.teacher_entropy, want) < 1e-6
    assert (out.teacher_entropy[~live] == 0).all()


@pytest.mark.parametrize("old", [True, False])
def test_sampled_reverse_kl_matches_float64(old):
    kw = make_case(teacher="sampled", seed=5)
    if not old:
        del kw["old_logprobs"]
    hp = dict(divergence="sampled_reverse_kl", kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    out = atod_loss(**kw, backend="reference", **hp)
    logp = student_logp64(kw)
    live = kw["loss_mask"]
    tgt = torch.where(live, kw["target_ids"], 0)
    lp = logp.gather(1, tgt[:, None]).squeeze(1)
    o = kw["old_logprobs"].double() if old else lp
    t = kw["teacher_logprobs"].double()
    d = -(t - o) * torch.exp(lp - o)
    assert rel_err(out.distill, torch.where(live, d, 0.0)) < 1e-6
    # The whole loss: λ·D + (1 − λ)(pg + 0.1·k3) − 0.01·H, pg clipped and dual-clipped.
    lam, adv, ref = (kw[k].double() for k in ("lam", "advantages", "ref_logprobs"))
    r = torch.exp(lp - o)
    pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    pg = torch.where((adv < 0) & (-3.0 * adv < pg), -3.0 * adv, pg)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    ent = -(logp.exp() * logp).sum(-1)
    ell = lam * d + (1 - lam) * (pg + 0.1 * k3) - 0.01 * ent
    want = torch.where(live, ell, 0.0).sum() / live.sum()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


SAMPLED_GRAD_CASES = [dict(), dict(kl_coef=0.2, dual_clip=2.0), dict(entropy_coef=0.05, temperature=0.7)]


@pytest.mark.parametrize("case", SAMPLED_GRAD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sampled_reverse_kl_finite_differences(case):
    # With old log-probs given, the gradient is the derivative of the value. Without them it is not
    # (o = lp detached: the value is lp − t, the slope D); see test_sampled_without_old_logprobs.
    kw = make_case(n=7, h=5, v=11, teacher="sampled", dtype=torch.float64, seed=3, logit_scale=3.0)
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    h, w, b = (kw.pop(k).requires_grad_(True) for k in PARAMS)

    def f(h, w, b):
        return atod_loss(student_hidden=h, student_weight=w, student_bias=b, **kw,
                         divergence="sampled_reverse_kl", **case).loss

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_sampled_without_old_logprobs(backend):
    # o = the current log-probs: the same loss and gradient as passing them (detached) as old_logprobs.
    kw = make_case(n=17, h=12, v=61, teacher="sampled", seed=6, logit_scale=2.0)
    hp = dict(divergence="sampled_reverse_kl", kl_coef=0.1, temperature=0.9)
    current = atod_loss(**kw, backend="reference", **hp).logprobs
    want = run(dict(kw, old_logprobs=current), "reference", **hp)
    del kw["old_logprobs"]
    got = run(kw, backend, chunk_size=8, **hp)
    live = kw["loss_mask"]
    t = kw["teacher_logprobs"]
    assert rel_err(got[0].distill, torch.where(live, current - t, 0.0)) < 1e-6  # D = lp − t at ratio 1
    for f in ("loss", "distill", "pg"):
        assert rel_err(getattr(got[0], f), getattr(want[0], f)) < 1e-5, f
    for k in want[1]:
        assert rel_err(got[1][k], want[1][k]) < 1e-5, k


# --- teacher_logits ------------------------------------------------------------------------

@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_teacher_logits_equal_the_dense_teacher_they_come_from(backend, div):
    kw = make_case(n=21, h=16, v=90, seed=7, logit_scale=2.0)
    z = kw["teacher_hidden"] @ kw["teacher_weight"].t() + kw["teacher_bias"]
    padded = torch.cat([z, torch.full((21, 5), 40.0)], 1)  # columns past the vocabulary must be ignored
    given = {k: v for k, v in kw.items() if not k.startswith("teacher")}
    hp = dict(divergence=div, temperature=1.3, jsd_beta=0.4)
    want = run(kw, "reference", **hp)
    got = run(dict(given, teacher_logits=padded), backend, chunk_size=8, **hp)
    for f in ("loss", "distill", "teacher_entropy", "entropy", "pg"):
        assert rel_err(getattr(got[0], f), getattr(want[0], f)) < 1e-5, f
    for k in want[1]:
        assert rel_err(got[1][k], want[1][k]) < 1e-5, k


def test_teacher_logits_are_not_modified_and_get_no_gradient():
    kw = make_case(n=10, h=8, v=30, teacher="logits", seed=9)
    kw["teacher_logits"].requires_grad_(True)
    kw["student_hidden"].requires_grad_(True)
    before = kw["teacher_logits"].detach().clone()
    for backend in ("reference", "torch"):
        atod_loss(**kw, backend=backend, divergence="forward_kl", chunk_size=4).loss.backward()
    assert kw["teacher_logits"].grad is None and torch.equal(kw["teacher_logits"].detach(), before)


def test_teacher_logits_finite_differences():
    kw = make_case(n=7, h=5, v=11, teacher="logits", dtype=torch.float64, seed=4, logit_scale=3.0)
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    h, w, b = (kw.pop(k).requires_grad_(True) for k in PARAMS)

    def f(h, w, b):
        return atod_loss(student_hidden=h, student_weight=w, student_bias=b, **kw, divergence="jsd",
                         jsd_beta=0.3).loss

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- optional inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_without_advantages_there_is_no_ppo_term(backend):
    kw = make_case(seed=11)
    del kw["advantages"], kw["lam"]
    out, grads = run(kw, backend, divergence="forward_kl", kl_coef=0.3, chunk_size=16)
    assert (out.pg == 0).all() and not out.clipped.any()
    live = kw["loss_mask"]
    assert (out.kl[live] > 0).all()  # still reported; λ = 1 leaves it out of the loss
    assert out.loss.item() == pytest.approx(out.distill[live].mean().item(), rel=1e-6)
    # The same as λ = 1 with any advantages.
    want, wgrads = run(dict(make_case(seed=11), lam=torch.ones(37)), "reference", divergence="forward_kl",
                       kl_coef=0.3)
    assert rel_err(out.loss, want.loss) < 1e-6
    for k in wgrads:
        assert rel_err(grads[k], wgrads[k]) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_without_old_logprobs_the_ratio_is_one(backend):
    kw = make_case(seed=13, logit_scale=2.0)
    current = atod_loss(**kw, backend="reference").logprobs
    want = run(dict(kw, old_logprobs=current), "reference", kl_coef=0.1, entropy_coef=0.01)
    del kw["old_logprobs"]
    got = run(kw, backend, kl_coef=0.1, entropy_coef=0.01, chunk_size=16)
    for f in ("loss", "pg", "kl", "distill", "logprobs"):
        assert rel_err(getattr(got[0], f), getattr(want[0], f)) < 1e-5, f
    assert torch.equal(got[0].clipped, want[0].clipped)
    for k in want[1]:
        assert rel_err(got[1][k], want[1][k]) < 1e-5, k


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_integer_and_missing_loss_mask(backend):
    kw = make_case(seed=17)
    want = run(kw, backend, chunk_size=16)
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.int8):
        got = run(dict(kw, loss_mask=kw["loss_mask"].to(dtype)), backend, chunk_size=16)
        assert torch.equal(got[0].loss, want[0].loss)
    every = run(dict(kw, loss_mask=torch.ones(37, dtype=torch.bool)), backend, chunk_size=16)
    got = run({k: v for k, v in kw.items() if k != "loss_mask"}, backend, chunk_size=16)
    assert torch.equal(got[0].loss, every[0].loss)


def test_positional_calls_still_work():
    kw = make_case(n=9, h=8, v=20, seed=19)
    pos = [kw.pop(k) for k in ("student_hidden", "student_weight", "target_ids", "old_logprobs", "advantages",
                               "lam", "loss_mask")]
    a = atod_loss(*pos, **kw).loss
    names = ("student_hidden", "student_weight", "target_ids", "old_logprobs", "advantages", "lam", "loss_mask")
    b = atod_loss(**dict(zip(names, pos, strict=True)), **kw).loss
    assert torch.equal(a, b)
    three = atod_loss(*pos[:3], student_bias=kw["student_bias"], teacher_hidden=kw["teacher_hidden"],
                      teacher_weight=kw["teacher_weight"], teacher_bias=kw["teacher_bias"])
    assert three.loss.isfinite() and (three.pg == 0).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("beta, same", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0, "forward_kl"), (1, "reverse_kl")])
def test_jsd_beta_limits_are_the_kls_exactly(backend, beta, same):
    kw = make_case(seed=23, logit_scale=2.0)
    got = run(kw, backend, divergence="jsd", jsd_beta=beta, chunk_size=16)
    want = run(kw, backend, divergence=same, chunk_size=16)
    assert torch.equal(got[0].loss, want[0].loss) and torch.equal(got[0].distill, want[0].distill)
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k])


# --- the torch backend against the reference ---------------------------------------------------

TORCH_CASES = {
    "sampled": dict(case=dict(teacher="sampled"), hp=dict(divergence="sampled_reverse_kl", kl_coef=0.1)),
    "sampled_no_old_odd": dict(case=dict(teacher="sampled", n=23, v=257, drop=("old_logprobs",)),
                               hp=dict(divergence="sampled_reverse_kl", entropy_coef=0.02, temperature=0.9)),
    "sampled_distill_only": dict(case=dict(teacher="sampled", drop=("old_logprobs", "advantages", "lam")),
                                 hp=dict(divergence="sampled_reverse_kl")),
    "logits_jsd": dict(case=dict(teacher="logits", logit_scale=2.0), hp=dict(divergence="jsd", jsd_beta=0.2)),
    "logits_distill_only": dict(case=dict(teacher="logits", n=19, v=301, drop=("old_logprobs", "advantages", "lam")),
                                hp=dict(divergence="reverse_kl")),
    "sparse_no_adv": dict(case=dict(teacher="sparse", drop=("advantages", "lam")), hp=dict(divergence="forward_kl")),
}


def case_inputs(name):
    c = dict(TORCH_CASES[name]["case"])
    drop = c.pop("drop", ())
    kw = make_case(**c, seed=list(TORCH_CASES).index(name))
    return {k: v for k, v in kw.items() if k not in drop}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_torch_backend_matches_reference(name):
    kw, hp = case_inputs(name), TORCH_CASES[name]["hp"]
    ref = run(kw, "reference", **hp)
    got = run(kw, "torch", chunk_size=16, **hp)  # chunks of 16: the last one partial
    for f in ("loss", "logprobs", "entropy", "distill", "pg", "kl", "teacher_entropy"):
        assert rel_err(getattr(got[0], f), getattr(ref[0], f)) < 1e-5, f
        assert getattr(got[0], f).dtype == torch.float32
    assert torch.equal(got[0].clipped, ref[0].clipped)
    for k in ref[1]:
        assert rel_err(got[1][k], ref[1][k]) < 1e-5, k


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "teacher, changes, hp, match",
    [
        ("none", {}, dict(divergence="sampled_reverse_kl"), "sampled_reverse_kl' needs teacher_logprobs"),
        ("dense", {}, dict(divergence="sampled_reverse_kl"),
         "needs teacher_logprobs.*got teacher_hidden/teacher_weight/teacher_bias"),
        ("sampled", {}, dict(divergence="reverse_kl"), "teacher_logprobs is the input of.*sampled_reverse_kl"),
        ("sampled", dict(teacher_logprobs=torch.zeros(5)), dict(divergence="sampled_reverse_kl"),
         "teacher_logprobs.*N=6"),
        ("sampled", dict(teacher_logprobs=torch.zeros(6, 1)), dict(divergence="sampled_reverse_kl"),
         "teacher_logprobs must have 1"),
        ("logits", dict(teacher_hidden=torch.zeros(6, 8)), {}, "one teacher only.*teacher_logits"),
        ("logits", dict(teacher_logprobs=torch.zeros(6)), {}, "one teacher only"),
        ("sparse", dict(teacher_logprobs=torch.zeros(6)), dict(divergence="forward_kl"), "one teacher only"),
        ("logits", dict(teacher_logits=torch.zeros(6, 19)), {}, "teacher_logits has 19 columns.*20"),
        ("logits", dict(teacher_logits=torch.zeros(5, 20)), {}, "teacher_logits.*N=6"),
        ("logits", dict(teacher_logits=torch.zeros(6, 20, dtype=torch.long)), {}, "teacher_logits must be a float"),
        ("logits", {}, dict(vocab_size=21), "vocab_size"),
    ],
)
def test_errors(teacher, changes, hp, match):
    kw = make_case(n=6, h=8, v=20, teacher=teacher)
    kw.update(changes)
    with pytest.raises(ValueError, match=match):
        atod_loss(**kw, **hp)


def test_narrower_vocab_size_takes_the_first_teacher_logit_columns():
    kw = make_case(n=8, h=8, v=20, teacher="logits", seed=29)  # teacher_logits [8, 23]
    kw["target_ids"] = kw["target_ids"] % 17
    out = atod_loss(**kw, vocab_size=17, divergence="forward_kl")
    sliced = dict(kw, student_weight=kw["student_weight"][:17], student_bias=kw["student_bias"][:17],
                  teacher_logits=kw["teacher_logits"][:, :17])
    assert out.loss.item() == pytest.approx(atod_loss(**sliced, divergence="forward_kl").loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["sampled_no_old_odd", "logits_jsd"])
def test_torch_backend_float64_matches_reference_tightly(name):
    kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case_inputs(name).items()}
    hp = TORCH_CASES[name]["hp"]
    ref = run(kw, "reference", **hp)
    got = run(kw, "torch", chunk_size=10, **hp)
    assert got[0].loss.dtype == torch.float64
    for f in ("loss", "distill", "teacher_entropy", "pg"):
        assert rel_err(getattr(got[0], f), getattr(ref[0], f)) < 1e-12, f
    for k in ref[1]:
        assert rel_err(got[1][k], ref[1][k]) < 1e-12, k


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("teacher", ["logits", "sampled"])
def test_masked_rows_garbage_in_teacher_inputs_does_not_leak(backend, teacher):
    kw = make_case(teacher=teacher, seed=31)
    dead = ~kw["loss_mask"]
    assert dead.any()
    clean = dict(kw)
    name = "teacher_logits" if teacher == "logits" else "teacher_logprobs"
    kw[name] = kw[name].clone()
    kw[name][dead] = float("nan")
    kw["target_ids"] = torch.where(dead, -100, kw["target_ids"])
    hp = dict(divergence="sampled_reverse_kl" if teacher == "sampled" else "forward_kl")
    want = run(clean, "reference", **hp)
    got = run(kw, backend, chunk_size=8, **hp)
    assert torch.isfinite(got[0].loss) and rel_err(got[0].loss, want[0].loss) < 1e-5
    for f in ("distill", "teacher_entropy"):
        assert (getattr(got[0], f)[dead] == 0).all()
    for k in want[1]:
        assert torch.isfinite(got[1][k]).all() and rel_err(got[1][k], want[1][k]) < 1e-5


def test_module_takes_the_optional_inputs_and_teacher_logits():
    from atod_fast import AtodLoss

    kw = make_case(n=12, h=8, v=30, teacher="logits", seed=37)
    mod = AtodLoss(divergence="jsd", jsd_beta=1.0, backend="torch", chunk_size=5)
    out = mod(kw["student_hidden"], kw["student_weight"], kw["target_ids"], loss_mask=kw["loss_mask"].int(),
              student_bias=kw["student_bias"], teacher_logits=kw["teacher_logits"])
    want = atod_loss(kw["student_hidden"], kw["student_weight"], kw["target_ids"], loss_mask=kw["loss_mask"],
                     student_bias=kw["student_bias"], teacher_logits=kw["teacher_logits"], divergence="reverse_kl",
                     backend="reference")
    assert rel_err(out.loss, want.loss) < 1e-5 and rel_err(out.teacher_entropy, want.teacher_entropy) < 1e-5
