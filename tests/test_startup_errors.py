"""Mistakes a new user makes are caught before any model loads: one ``atod-fast: error:`` line, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import atod_fast
from atod_fast.cli import main


def _one_line_error(capsys, argv: list[str], budget_s: float = 5.0) -> str:
    t0 = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, (code, out.out[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("atod-fast: error: "), err
    assert "Traceback" not in err
    assert elapsed < budget_s, f"{elapsed:.1f} s before the error"
    return err


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No hub: HF_HUB_OFFLINE=1 and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("override, needle", [
    ("model.student=/nonexistent/path", "model.student: no such directory: /nonexistent/path"),
    ("model.student=./not/here", "model.student: no such directory: ./not/here"),
    ("model.teacher=/nonexistent/teacher", "model.teacher: no such directory: /nonexistent/teacher"),
    ("model.teacher=~/no-such-teacher", "model.teacher: no such directory: ~/no-such-teacher"),
    ("model.student=a/b/c", "model.student: no such directory: a/b/c"),
])
def test_missing_model_paths(override, needle, capsys, offline_hub, tmp_path):
    err = _one_line_error(capsys, ["train", override, "--output-dir", str(tmp_path / "run")])
    assert needle in err
    assert not (tmp_path / "run").exists()


def test_missing_reference_path_counts_only_when_used(capsys, offline_hub, tmp_path):
    from atod_fast.trainer.config import check_machine, load_train_config

    err = _one_line_error(capsys, ["train", "loss.kl_coef=0.1", "model.reference=/no/ref", "--output-dir",
                                   str(tmp_path / "run")])
    assert "model.reference: no such directory: /no/ref" in err
    # With kl_coef=0 the reference is never loaded, so it is not checked either.
    check_machine(load_train_config(None, ["model.reference=/no/ref"]))


def test_hub_name_not_in_the_cache_while_offline(capsys, offline_hub, tmp_path):
    for key in ("model.student", "model.teacher"):
        err = _one_line_error(capsys, ["train", f"{key}=nobody-xyz/no-such-model", "--output-dir",
                                       str(tmp_path / "run")])
        assert f"{key}: 'nobody-xyz/no-such-model' is neither a local directory nor in the Hugging Face cache" in err
        assert "HF_HUB_OFFLINE=1" in err


def test_a_folder_without_a_model(capsys, offline_hub, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["train", f"model.teacher={tmp_path / 'empty'}", "--output-dir",
                                   str(tmp_path / "run")])
    assert f"model.teacher: {tmp_path / 'empty'} holds no config.json" in err


def test_sft_init_path(capsys, offline_hub, tmp_path):
    err = _one_line_error(capsys, ["sft", "init=/nonexistent/init", "--output-dir", str(tmp_path / "out")])
    assert "init: no such directory: /nonexistent/init" in err


@pytest.mark.parametrize("text, needle", [
    ("ppo:\n  epochs: 3\n bad: [1,\n", "is not valid YAML at line 3, column 2"),
    ("ppo: {epochs: 2\n", "is not valid YAML at line 2, column 1"),
    ("ppo:\n\tepochs: 2\n", "is not valid YAML at line 2, column 1"),
    ("- ppo\n- epochs\n", "must hold a mapping of keys"),
])
def test_malformed_yaml(text, needle, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_line_error(capsys, ["train", "--config", str(path)])
    assert f"atod-fast: error: --config: {path} " in err and needle in err


def test_a_subprocess_user_sees_one_line(tmp_path):
    """The whole command as a user runs it: the import of torch is most of the time."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "atod_fast", "train", "model.student=/nonexistent/path",
                          "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2
    assert res.stderr.strip() == "atod-fast: error: model.student: no such directory: /nonexistent/path"
    assert elapsed < 60, elapsed  # the hub's retries took ~77 s here before the check


def _loss_case():
    n, h, v = 4, 8, 16
    g = torch.Generator().manual_seed(0)
    return dict(student_hidden=torch.randn(n, h, generator=g), student_weight=torch.randn(v, h, generator=g),
                target_ids=torch.randint(0, v, (n,), generator=g), old_logprobs=torch.full((n,), -2.0),
                advantages=torch.randn(n, generator=g), lam=torch.full((n,), 0.5),
                loss_mask=torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["triton", "triton_fused"])
def test_triton_backends_on_a_cpu_without_the_interpreter(backend, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kw = _loss_case()
    with pytest.raises(ValueError, match=rf"^backend='{backend}' needs CUDA tensors, got tensors on cpu.*"
                                         r"TRITON_INTERPRET=1.*backend='torch'"):
        atod_fast.atod_loss(**kw, backend=backend)
    with pytest.raises(ValueError, match=rf"^backend='{backend}' needs CUDA tensors.*TRITON_INTERPRET=1"):
        atod_fast.fused_logprobs_entropy(kw["student_hidden"], kw["student_weight"], kw["target_ids"],
                                         backend=backend)
    # auto never picks Triton for CPU tensors, so it needs nothing.
    assert torch.isfinite(atod_fast.atod_loss(**kw, backend="auto").loss)


def test_triton_gae_on_a_cpu_without_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    r = torch.tensor([0.0, 0.0, 1.0])
    v = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1.*'torch'"):
        atod_fast.compute_gae(r, v, torch.tensor([0, 3]), torch.ones(3, dtype=torch.bool), backend="triton")


def test_eval_checks_the_teacher_it_compares_against(capsys, offline_hub, tmp_path):
    from atod_fast.trainer.config import load_train_config, to_yaml

    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text('{"step": 1, "max_steps": 1}')
    (ckpt / "config.yaml").write_text(to_yaml(load_train_config(None, ["model.teacher=/moved/teacher"])))
    err = _one_line_error(capsys, ["eval", "--checkpoint", str(ckpt)])
    assert "model.teacher: no such directory: /moved/teacher" in err
