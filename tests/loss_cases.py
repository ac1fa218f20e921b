"""Random inputs for atod_loss tests, shared by the reference and the fused-backend tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """Every float buffer from torch.empty starts as NaN, so an element a kernel forgets to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def make_case(n=37, h=48, v=1000, *, ht=None, vt=None, teacher="dense", k=8, bias=True, teacher_bias=True,
              ref=True, masked_frac=0.25, dtype=torch.float32, seed=0, device="cpu", logit_scale=1.0):
    """Inputs as keyword arguments for ``atod_loss``; old log-probs are near the current ones.

    teacher: "dense" (hidden + head), "logits" (teacher_logits [n, vt + 3]), "sparse" (top-k),
    "sampled" (teacher_logprobs, for divergence="sampled_reverse_kl") or "none".
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    ht = h if ht is None else ht
    vt = v if vt is None else vt
    kw = dict(
        student_hidden=rnd(n, h),
        student_weight=rnd(v, h, scale=logit_scale / h**0.5),
        target_ids=torch.randint(0, min(v, vt), (n,), generator=g).to(device),
        advantages=rnd(n),
        lam=torch.rand(n, generator=g, dtype=torch.float64).to(torch.float32).to(device),
        loss_mask=(torch.rand(n, generator=g) >= masked_frac).to(device),
    )
    if bias:
        kw["student_bias"] = rnd(v, scale=0.1)
    # Old log-probs within ~±0.3 of log(1/V) so that some ratios clip and some do not.
    kw["old_logprobs"] = (torch.full((n,), -float(torch.log(torch.tensor(float(v)))), dtype=torch.float64)
                          + torch.rand(n, generator=g, dtype=torch.float64) * 0.6 - 0.3).to(torch.float32).to(device)
    if ref:
        kw["ref_logprobs"] = (kw["old_logprobs"] + rnd(n, scale=0.1).float()).to(device)
    if teacher == "dense":
        kw["teacher_hidden"] = rnd(n, ht)
        kw["teacher_weight"] = rnd(vt, ht, scale=logit_scale / ht**0.5)
        if teacher_bias:
            kw["teacher_bias"] = rnd(vt, scale=0.1)
    elif teacher == "sparse":
        kw["teacher_topk_ids"] = torch.stack(
            [torch.randperm(min(v, vt), generator=g)[:k] for _ in range(n)]).to(device)
        kw["teacher_topk_logprobs"] = torch.log_softmax(rnd(n, k, scale=2.0).float(), -1).to(device)
    elif teacher == "logits":
        # Wider than the vocabulary in use (a teacher head padded further): only the first columns count.
        kw["teacher_logits"] = rnd(n, vt + 3, scale=logit_scale)
    elif teacher == "sampled":
        # Teacher log-probs of the targets within ±1 of the old ones: D takes both signs.
        kw["teacher_logprobs"] = kw["old_logprobs"] + rnd(n).float().clamp(-1, 1)
    return kw
