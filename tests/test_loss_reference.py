"""The reference ATOD loss, checked against hand computations, identities and finite differences."""

import math

import pytest
import torch
from loss_cases import make_case

from atod_fast import atod_loss

LN = math.log
LN_04 = math.log(0.4)


def eye_inputs(z_student, z_teacher=None, target=1, old=LN_04, adv=2.0, lam=0.3, ref=None):
    """V = H = 3 with identity heads, so hidden states are the logits."""
    n = 1
    kw = dict(
        student_hidden=torch.tensor([z_student], dtype=torch.float64),
        student_weight=torch.eye(3, dtype=torch.float64),
        target_ids=torch.tensor([target]),
        old_logprobs=torch.tensor([old], dtype=torch.float64),
        advantages=torch.tensor([adv], dtype=torch.float64),
        lam=torch.tensor([lam], dtype=torch.float64),
        loss_mask=torch.ones(n, dtype=torch.bool),
    )
    if z_teacher is not None:
        kw["teacher_hidden"] = torch.tensor([z_teacher], dtype=torch.float64)
        kw["teacher_weight"] = torch.eye(3, dtype=torch.float64)
    if ref is not None:
        kw["ref_logprobs"] = torch.tensor([ref], dtype=torch.float64)
    return kw


# p_s = [1/4, 1/2, 1/4], p_t = [1/3, 1/3, 1/3]
Z_S = [0.0, LN(2.0), 0.0]
Z_T = [0.0, 0.0, 0.0]


def test_hand_computed_divergences_and_entropy():
    kw = eye_inputs(Z_S, Z_T)
    rev = 0.5 * LN(0.75) + 0.5 * LN(1.5)
    fwd = (2 * LN(4 / 3) + LN(2 / 3)) / 3
    kl_t_m = (2 * LN(8 / 7) + LN(4 / 5)) / 3
    kl_s_m = 0.5 * LN(6 / 7) + 0.5 * LN(6 / 5)
    for div, want in (("reverse_kl", rev), ("forward_kl", fwd), ("jsd", 0.5 * kl_t_m + 0.5 * kl_s_m)):
        out = atod_loss(**kw, divergence=div)
        assert out.distill.item() == pytest.approx(want, rel=1e-12)
    # β = 0.25: m = 0.75 p_s + 0.25 p_t
    m = [0.75 * a + 0.25 * b for a, b in zip([0.25, 0.5, 0.25], [1 / 3] * 3, strict=True)]
    kl_t_m = sum(1 / 3 * LN((1 / 3) / mi) for mi in m)
    kl_s_m = sum(p * LN(p / mi) for p, mi in zip([0.25, 0.5, 0.25], m, strict=True))
    out = atod_loss(**kw, divergence="jsd", jsd_beta=0.25)
    assert out.distill.item() == pytest.approx(0.25 * kl_t_m + 0.75 * kl_s_m, rel=1e-12)
    assert out.entropy.item() == pytest.approx(1.5 * LN(2.0), rel=1e-12)
    assert out.logprobs.item() == pytest.approx(LN(0.5), rel=1e-12)


def test_hand_computed_ppo_kl_and_mix():
    # r = 0.5 / 0.4 = 1.25, A = 2 -> unclipped -2.5, clipped -2.4: max is the clipped branch.
    kw = eye_inputs(Z_S, Z_T, ref=LN(0.25))
    out = atod_loss(**kw, kl_coef=0.1, entropy_coef=0.01)
    assert out.pg.item() == pytest.approx(-2.4, rel=1e-12)
    assert out.clipped.item() is True
    kl = 0.5 + LN(2.0) - 1.0  # δ = ln(1/4) − ln(1/2) = −ln 2
    assert out.kl.item() == pytest.approx(kl, rel=1e-12)
    rev = 0.5 * LN(1.125)
    want = 0.3 * rev + 0.7 * (-2.4 + 0.1 * kl) - 0.01 * 1.5 * LN(2.0)
    assert out.loss.item() == pytest.approx(want, rel=1e-12)
    # A = −1: unclipped 1.25 beats clipped 1.2.
    out = atod_loss(**eye_inputs(Z_S, Z_T, adv=-1.0))
    assert out.pg.item() == pytest.approx(1.25, rel=1e-12)
    assert out.clipped.item() is False


def test_hand_computed_dual_clip():
    # r = 0.5 / 0.1 = 5, A = −1: surrogate max(5, 1.2) = 5, dual clip with c = 3 bounds it at 3.
    kw = eye_inputs(Z_S, Z_T, old=LN(0.1), adv=-1.0)
    assert atod_loss(**kw).pg.item() == pytest.approx(5.0, rel=1e-12)
    out = atod_loss(**kw, dual_clip=3.0)
    assert out.pg.item() == pytest.approx(3.0, rel=1e-12)
    assert out.clipped.item() is True
    # Dual clip never touches positive advantages.
    kw = eye_inputs(Z_S, Z_T, old=LN(0.1), adv=1.0)
    assert atod_loss(**kw, dual_clip=3.0).pg.item() == pytest.approx(-1.2, rel=1e-12)


def test_hand_computed_sparse_teacher_and_temperature():
    kw = eye_inputs(Z_S)
    kw["teacher_topk_ids"] = torch.tensor([[1, 0]])
    kw["teacher_topk_logprobs"] = torch.tensor([[LN(0.6), LN(0.2)]], dtype=torch.float64)
    out = atod_loss(**kw, divergence="forward_kl")
    # p̂ = [0.75, 0.25]; log p_s at ids = [ln 1/2, ln 1/4]
    assert out.distill.item() == pytest.approx(0.75 * LN(1.5), rel=1e-12)
    # Temperature 2: student logits [0, ln2/2, 0] -> p ∝ [1, √2, 1].
    out = atod_loss(**eye_inputs(Z_S), temperature=2.0)
    s2 = math.sqrt(2.0)
    assert out.logprobs.item() == pytest.approx(LN(s2 / (2 + s2)), rel=1e-12)


def test_no_teacher_gives_zero_distill():
    out = atod_loss(**make_case(teacher="none"))
    assert torch.all(out.distill == 0)


@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "jsd"])
def test_teacher_equal_to_student_gives_zero_divergence(div):
    kw = make_case(n=9, h=16, v=50, teacher="none", dtype=torch.float64)
    kw.update(teacher_hidden=kw["student_hidden"].clone(), teacher_weight=kw["student_weight"].clone(),
              teacher_bias=kw["student_bias"].clone())
    out = atod_loss(**kw, divergence=div)
    assert out.distill.abs().max().item() < 1e-12


def test_lambda_one_ignores_advantages_and_lambda_zero_ignores_teacher():
    kw = make_case(n=11, h=16, v=40, dtype=torch.float64)
    kw["lam"] = torch.ones(11)
    a = atod_loss(**kw).loss
    kw2 = dict(kw, advantages=torch.randn(11, dtype=torch.float64) * 10, old_logprobs=kw["old_logprobs"] - 1.0)
    assert atod_loss(**kw2).loss.item() == pytest.approx(a.item(), rel=1e-12)

    kw["lam"] = torch.zeros(11)
    b = atod_loss(**kw).loss
    kw3 = dict(kw, teacher_hidden=torch.randn_like(kw["teacher_hidden"]) * 3)
    assert atod_loss(**kw3).loss.item() == pytest.approx(b.item(), rel=1e-12)
    kw4 = {k: v for k, v in kw.items() if not k.startswith("teacher")}
    assert atod_loss(**kw4).loss.item() == pytest.approx(b.item(), rel=1e-12)


def test_ratio_one_gives_minus_advantage():
    kw = make_case(n=13, h=16, v=40, dtype=torch.float64)
    kw["old_logprobs"] = atod_loss(**kw).logprobs.clone()
    out = atod_loss(**kw)
    live = kw["loss_mask"]
    torch.testing.assert_close(out.pg[live], -kw["advantages"][live], rtol=1e-12, atol=1e-12)
    assert not out.clipped.any()


def test_per_token_outputs_and_normalizer():
    kw = make_case()
    out = atod_loss(**kw)
    for name in ("logprobs", "entropy", "distill", "pg", "kl"):
        t = getattr(out, name)
        assert t.shape == (37,) and t.dtype == torch.float32 and not t.requires_grad
        assert torch.all(t[~kw["loss_mask"]] == 0)
    assert out.clipped.dtype == torch.bool and not out.clipped[~kw["loss_mask"]].any()
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    lam, m = kw["lam"], kw["loss_mask"]
    ell = lam * out.distill + (1 - lam) * out.pg
    assert out.loss.item() == pytest.approx((ell * m).sum().item() / m.sum().item(), rel=1e-5)
    out7 = atod_loss(**kw, normalizer=7.0)
    assert out7.loss.item() == pytest.approx((ell * m).sum().item() / 7.0, rel=1e-5)
    outt = atod_loss(**kw, normalizer=torch.tensor(7.0))
    assert outt.loss.item() == pytest.approx(out7.loss.item(), rel=1e-6)


def test_all_masked_is_zero_with_zero_grads_even_with_garbage():
    kw = make_case(n=5, h=8, v=20)
    kw["loss_mask"] = torch.zeros(5, dtype=torch.bool)
    kw["advantages"] = torch.full((5,), float("nan"))
    kw["old_logprobs"] = torch.full((5,), -float("inf"))
    kw["target_ids"] = torch.full((5,), -100)
    kw["lam"] = torch.full((5,), 7.0)
    for name in ("student_hidden", "student_weight", "student_bias"):
        kw[name].requires_grad_(True)
    out = atod_loss(**kw)
    assert out.loss.item() == 0.0
    out.loss.backward()
    for name in ("student_hidden", "student_weight", "student_bias"):
        g = kw[name].grad
        assert g is not None and torch.all(g == 0)


def test_gradients_only_flow_to_the_student():
    kw = make_case(n=6, h=8, v=20)
    for name in ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                 "teacher_bias", "advantages", "old_logprobs"):
        kw[name].requires_grad_(True)
    atod_loss(**kw, kl_coef=0.1).loss.backward()
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert kw[name].grad is not None
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias", "advantages", "old_logprobs"):
        assert kw[name].grad is None


def test_vocab_size_uses_the_first_rows_of_both_heads():
    kw = make_case(n=10, h=12, v=30, vt=34, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"V=30.*Vt=34"):
        atod_loss(**kw)
    out = atod_loss(**kw, vocab_size=28)
    sliced = dict(kw, student_weight=kw["student_weight"][:28], student_bias=kw["student_bias"][:28],
                  teacher_weight=kw["teacher_weight"][:28], teacher_bias=kw["teacher_bias"][:28])
    want = atod_loss(**sliced)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-12)
    torch.testing.assert_close(out.distill, want.distill)


def test_low_precision_inputs_compute_in_float32():
    kw = make_case(n=16, h=32, v=64)
    kw16 = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    out = atod_loss(**kw16)
    assert out.loss.dtype == torch.float32 and out.entropy.dtype == torch.float32
    assert torch.isfinite(out.loss)


# --- finite differences -------------------------------------------------------------------

GRAD_CASES = [
    dict(teacher="dense", divergence="reverse_kl"),
    dict(teacher="dense", divergence="forward_kl"),
    dict(teacher="dense", divergence="jsd", jsd_beta=0.3),
    dict(teacher="sparse", divergence="forward_kl"),
    dict(teacher="none", divergence="reverse_kl", dual_clip=2.0),
    dict(teacher="dense", divergence="reverse_kl", temperature=0.7, entropy_coef=0.05),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_finite_difference_gradients(case):
    case = dict(case)
    teacher = case.pop("teacher")
    kw = make_case(n=7, h=5, v=11, ht=6, teacher=teacher, dtype=torch.float64, seed=3, logit_scale=3.0)
    kw["advantages"] = kw["advantages"].double()
    kw["old_logprobs"] = kw["old_logprobs"].double()
    kw["lam"] = kw["lam"].double()
    kw["ref_logprobs"] = kw["ref_logprobs"].double()
    h, w, b = (kw.pop(k).requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))

    def f(h, w, b):
        return atod_loss(student_hidden=h, student_weight=w, student_bias=b, kl_coef=0.2, **kw, **case).loss

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- validation ---------------------------------------------------------------------------

def _bad(**changes):
    kw = make_case(n=6, h=8, v=20)
    kw["loss_mask"] = torch.ones(6, dtype=torch.bool)  # value checks only look at live rows
    kw.update(changes)
    return kw


@pytest.mark.parametrize(
    "changes, extra, match",
    [
        (dict(target_ids=torch.zeros(5, dtype=torch.long)), {}, "target_ids.*N=6"),
        (dict(advantages=torch.zeros(7)), {}, "advantages.*N=6"),
        (dict(lam=torch.zeros(4)), {}, "lam.*N=6"),
        (dict(loss_mask=torch.ones(6, dtype=torch.bool)[:5]), {}, "loss_mask.*N=6"),
        (dict(student_weight=torch.zeros(20, 9)), {}, "student_weight.*H=9"),
        (dict(student_bias=torch.zeros(19)), {}, "student_bias"),
        (dict(target_ids=torch.tensor([0, 1, 2, 3, 4, 20])), {}, r"target_ids must be in \[0, 20\)"),
        (dict(target_ids=torch.tensor([0, 1, 2, 3, 4, -1])), {}, "target_ids"),
        (dict(target_ids=torch.zeros(6)), {}, "target_ids must be an integer"),
        (dict(lam=torch.tensor([0.0, 0.5, 1.0, 1.5, 0.2, 0.2])), {}, r"lam must be in \[0, 1\]"),
        (dict(loss_mask=torch.ones(6)), {}, "loss_mask must be a bool or integer"),
        (dict(loss_mask=torch.tensor([1, 1, 0, 2, 1, 1])), {}, "integer loss_mask must hold only 0 and 1, found 2"),
        (dict(lam=None), {}, "lam is required when advantages are given"),
        (dict(teacher_weight=torch.zeros(20, 7)), {}, "teacher_weight.*Ht=7"),
        (dict(teacher_hidden=torch.zeros(5, 8)), {}, "teacher_hidden.*N=6"),
        (dict(teacher_weight=torch.zeros(22, 8), teacher_bias=None), {}, r"V=20.*Vt=22"),
        (dict(ref_logprobs=torch.zeros(3)), {}, "ref_logprobs"),
        ({}, dict(divergence="kl"), "divergence"),
        ({}, dict(divergence="jsd", jsd_beta=1.5), r"jsd_beta must be in \[0.0, 1.0\]"),
        ({}, dict(jsd_beta=-0.1), "jsd_beta"),
        ({}, dict(temperature=0.0), "temperature"),
        ({}, dict(temperature=-1.0), "temperature"),
        ({}, dict(dual_clip=1.0), "dual_clip"),
        ({}, dict(clip_eps_low=-0.1), "clip_eps_low"),
        ({}, dict(normalizer=0.0), "normalizer"),
        ({}, dict(vocab_size=21), "vocab_size"),
        ({}, dict(backend="cuda-magic"), "backend"),
        ({}, dict(chunk_size=0), "chunk_size"),
    ],
)
def test_validation_errors(changes, extra, match):
    with pytest.raises(ValueError, match=match):
        atod_loss(**_bad(**changes), **extra)


def test_sparse_teacher_validation():
    kw = make_case(n=6, h=8, v=20, teacher="sparse", k=4)
    with pytest.raises(ValueError, match="K mismatch"):
        atod_loss(**dict(kw, teacher_topk_logprobs=kw["teacher_topk_logprobs"][:, :3]), divergence="forward_kl")
    with pytest.raises(ValueError, match="forward_kl"):
        atod_loss(**kw, divergence="reverse_kl")
    dense = make_case(n=6, h=8, v=20)
    with pytest.raises(ValueError, match="one teacher only"):
        atod_loss(**kw, teacher_hidden=dense["teacher_hidden"], teacher_weight=dense["teacher_weight"],
                  divergence="forward_kl")
    bad_ids = kw["teacher_topk_ids"].clone()
    bad_ids[kw["loss_mask"].nonzero()[0, 0], 0] = 25
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        atod_loss(**dict(kw, teacher_topk_ids=bad_ids), divergence="forward_kl")


def test_masked_rows_may_hold_ignore_index():
    kw = make_case(n=6, h=8, v=20)
    kw["loss_mask"] = torch.tensor([True, True, True, False, False, True])
    kw["target_ids"][3:5] = -100
    out = atod_loss(**kw)
    assert torch.isfinite(out.loss)
