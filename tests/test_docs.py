"""Every ```python block of README.md and docs/*.md runs, on tiny random models on the CPU.

A block that needs context a reader would supply (a policy, a batch, tensors of the right
shapes) says so in an HTML comment on the line before it, ``<!-- doctest: setup=NAME -->``;
``SETUPS[NAME]`` builds that context and ``CHECKS[NAME]`` (where there is one) checks what the
block did with it. A block without a marker runs in an empty namespace. Nothing is skipped: a
marker naming an unknown setup, or a marker without a python block under it, fails.

The README and docs pages are also checked for what the project promises about them: the CI
test command, the size of the README, a link to every docs page, and relative links that resolve.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*doctest:\s*setup=([\w-]+)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")


def extract_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """(line number, setup name or None, source) of each ```python block of a markdown file."""
    lines = path.read_text().splitlines()
    blocks, pending, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            pending = (i + 1, marker.group(1))
        elif fence:
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if fence.group(1) == "python":
                blocks.append((start + 1, pending[1] if pending else None, "\n".join(body) + "\n"))
            elif pending:
                raise AssertionError(f"{path.name}:{pending[0]}: doctest marker above a {fence.group(1) or 'plain'} "
                                     "block; markers go right above ```python blocks")
            pending = None
        elif line.strip() and pending:
            raise AssertionError(f"{path.name}:{pending[0]}: doctest marker not followed by a ```python block")
        i += 1
    return blocks


BLOCKS = [(p, line, setup, src) for p in PAGES for line, setup, src in extract_blocks(p)]


# ----------------------------------------------------------------------------- setups
def _loss_tensors() -> dict:
    """Tensors for the functional atod_loss call: N rows, student H, teacher Ht, vocabulary V."""
    g = torch.Generator().manual_seed(0)
    n, h, ht, v = 24, 32, 48, 128
    mask = torch.ones(n, dtype=torch.bool)
    mask[-4:] = False
    return {
        "student_hidden": torch.randn(n, h, generator=g).requires_grad_(),
        "student_weight": (0.1 * torch.randn(v, h, generator=g)).requires_grad_(),
        "target_ids": torch.randint(0, v, (n,), generator=g),
        "old_logprobs": -3.0 * torch.rand(n, generator=g) - 2.0,
        "advantages": torch.randn(n, generator=g),
        "lam": torch.rand(n, generator=g),
        "loss_mask": mask,
        "t_hidden": torch.randn(n, ht, generator=g),
        "t_weight": 0.1 * torch.randn(v, ht, generator=g),
    }


def _tiny_llama(vocab: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


class _Tokenizer:
    """Stands in for a tokenizer: only its length (the real vocabulary) is read."""

    def __len__(self) -> int:
        return 500


def _hf_models() -> dict:
    """A tiny student and a wider teacher whose heads are padded past the tokenizer's 500 ids
    (512 and 640 rows, as Qwen2.5's 0.5B and 7B heads are padded differently), and one batch."""
    b, t = 2, 12
    g = torch.Generator().manual_seed(1)
    policy, teacher = _tiny_llama(512, 64, seed=0), _tiny_llama(640, 96, seed=1).eval()
    ids = torch.randint(0, 500, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, -3:] = 0  # right padding on the second sequence
    loss_mask = attn[:, 1:].bool().clone()
    loss_mask[:, :3] = False  # the prompt
    batch = {
        "input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
        "old_logprobs": -3.0 * torch.rand(b, t - 1, generator=g) - 4.0,
        "ref_logprobs": -3.0 * torch.rand(b, t - 1, generator=g) - 4.0,
        "advantages": torch.randn(b, t - 1, generator=g),
        "turn_idx": torch.arange(t - 1).div(4, rounding_mode="floor").expand(b, -1).contiguous(),
    }
    return {"policy": policy, "teacher": teacher, "tokenizer": _Tokenizer(), "batch": batch, "step": 3,
            "optimizer": torch.optim.SGD(policy.parameters(), lr=0.5), "ids": ids, "attn": attn}


SETUPS = {"loss_tensors": _loss_tensors, "hf_trainer": _hf_models, "hf_policy": _hf_models}


# ----------------------------------------------------------------------------- checks
def _check_loss_tensors(ns: dict) -> None:
    out = ns["out"]
    assert torch.isfinite(out.loss)
    for name in ("student_hidden", "student_weight"):
        grad = ns[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert not out.distill[ns["loss_mask"]].eq(0).all()  # the teacher took part


def _check_hf_trainer(ns: dict) -> None:
    policy, teacher = ns["policy"], ns["teacher"]
    watched = {"embedding": policy.model.embed_tokens.weight, "lm_head": policy.lm_head.weight,
               "first layer": policy.model.layers[0].self_attn.q_proj.weight}
    before = {k: p.detach().clone() for k, p in watched.items()}
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    stats = ns["train_step"](policy, teacher, ns["batch"], ns["step"], ns["optimizer"])
    assert set(stats) == {"loss", "clipfrac", "entropy", "distill"}
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    assert stats["distill"] > 0
    for name, p in watched.items():  # the optimizer step moved them: the backward reached them
        assert not torch.equal(before[name], p.detach()), f"no gradient reached the policy's {name}"
    assert all(torch.equal(a, p) for a, p in zip(teacher_before, teacher.parameters(), strict=True))


def _check_hf_policy(ns: dict) -> None:
    n = ns["ids"][:, 1:].numel()
    logprobs, entropy = ns["logprobs"], ns["entropy"]
    assert logprobs.shape == entropy.shape == (n,)
    assert torch.isfinite(logprobs).all() and (logprobs <= 0).all()
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(512.0)) + 1e-4).all()


CHECKS = {"loss_tensors": _check_loss_tensors, "hf_trainer": _check_hf_trainer, "hf_policy": _check_hf_policy}


# ----------------------------------------------------------------------------- tests
@pytest.fixture
def restore_env_registry():
    """Blocks may register example environments; the registry is process-wide."""
    from atod_fast.envs import base

    saved = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


@pytest.mark.parametrize(("page", "line", "setup", "source"), BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in BLOCKS])
def test_code_block_runs(page, line, setup, source, restore_env_registry):
    if setup is not None:
        assert setup in SETUPS, f"{page.name}:{line}: unknown doctest setup {setup!r}; known: {sorted(SETUPS)}"
    torch.manual_seed(0)
    ns = dict(SETUPS[setup]()) if setup else {}
    ns["__name__"] = f"doc_{page.stem}_{line}"
    exec(compile(source, f"{page.relative_to(ROOT)}:{line}", "exec"), ns)
    if setup in CHECKS:
        CHECKS[setup](ns)


def test_every_page_has_been_read():
    assert (ROOT / "docs" / "README.md") in PAGES and len(BLOCKS) >= 5  # a broken glob must not pass silently
    assert {s for _, _, s, _ in BLOCKS if s} == set(SETUPS), "every setup is used by a block"


def test_marker_without_python_block_is_an_error(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("<!-- doctest: setup=hf_policy -->\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match="marker above a bash block"):
        extract_blocks(page)
    page.write_text("<!-- doctest: setup=hf_policy -->\nSome text.\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="not followed by a"):
        extract_blocks(page)


def test_readme_keeps_its_promises():
    text = (ROOT / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest' in text  # .ci/run greps for it
    assert len(text.splitlines()) <= 250
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"
