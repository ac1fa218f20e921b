"""Packaging: the public imports, the console script, and a non-editable install."""

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import atod_fast

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_signatures():
    from atod_fast import AnnealSchedule, atod_loss

    params = inspect.signature(atod_loss).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["student_hidden", "student_weight", "target_ids", "old_logprobs", "advantages",
                          "lam", "loss_mask"]
    # The PPO inputs and the mask are optional (distillation alone), still positional.
    assert all(params[n].default is None for n in positional[3:])
    assert all(params[n].default is inspect.Parameter.empty for n in positional[:3])
    keyword = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keyword == dict(
        student_bias=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_topk_ids=None,
        teacher_topk_logprobs=None, teacher_logits=None, teacher_logprobs=None, ref_logprobs=None,
        divergence="reverse_kl", jsd_beta=0.5, temperature=1.0, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
        kl_coef=0.0, entropy_coef=0.0, normalizer=None, vocab_size=None, backend="auto", chunk_size=None,
    )
    s = inspect.signature(AnnealSchedule).parameters
    assert [n for n, p in s.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == ["total_steps", "turn_horizon"]
    assert {n: p.default for n, p in s.items() if p.kind is p.KEYWORD_ONLY} == dict(
        lambda_max=0.9, lambda_min=0.1, time_decay="cosine", turn_decay="cosine")


def test_kernels_are_installed_under_the_package():
    import atod_fast.kernels as k

    assert k.__name__ == "atod_fast.kernels"
    assert Path(k.__file__).resolve().parent == ROOT / "kernels" or "site-packages" in k.__file__


def test_cli_version_and_help():
    out = subprocess.run(["atod-fast", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"atod-fast {atod_fast.__version__}"
    out = subprocess.run([sys.executable, "-m", "atod_fast", "--help"], capture_output=True, text=True, check=True)
    assert "atod-fast" in out.stdout and "ATOD" in out.stdout


@pytest.mark.timeout(600)
def test_regular_install_imports_kernels(tmp_path):
    """A non-editable install (a wheel) must carry kernels/ as atod_fast.kernels."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "*.so", ".hypothesis",
        "benchmarks", "tests"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(src)], check=True, capture_output=True)
    assert (target / "atod_fast" / "kernels" / "__init__.py").is_file()
    assert not (target / "kernels").exists(), "the top-level kernels/ folder must not be installed as `kernels`"
    env = dict(os.environ, PYTHONPATH=str(target))
    code = "import atod_fast, atod_fast.kernels as k; print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().startswith(str(target))


def test_checkout_root_on_sys_path_does_not_hide_hf_kernels():
    # ``python -m`` from the checkout's root puts kernels/ on sys.path as plain ``kernels``; transformers imports
    # Hugging Face's package of that name whenever it is installed, and must get it.
    root = Path(__file__).resolve().parent.parent
    code = ("import importlib.metadata as m, kernels, transformers.activations\n"
            "try:\n    m.version('kernels'); hf = True\nexcept m.PackageNotFoundError:\n    hf = False\n"
            "print(hf, kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hf, path = out.stdout.split()
    local = Path(path).resolve() == root / "kernels" / "__init__.py"
    assert local != (hf == "True"), out.stdout
