"""Data-parallel training under ``torchrun --standalone --nproc_per_node 2`` on the CPU (gloo, fp32).

Each run is a subprocess with a timeout; it counts as successful only when every rank wrote its
marker file (tests/dist/worker.py), not from torchrun's exit code alone. Runs are shared between
assertions to keep the suite short: one 1-process and one 2-process loss run over every engine,
one 2-step ZeRO-3 ``atod-fast train`` and its resume from the step-1 checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atod_fast.trainer.config import ConfigError, load_train_config

WORKER = Path(__file__).parent / "dist" / "worker.py"
HAS_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (.ci/run installs it: pip install "
                              "--no-build-isolation deepspeed==0.19.8, after torch)")

TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "eval.episodes=4", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=1", "cpu_threads=1",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private teacher cache filled once, and one DeepSpeed op build directory for every run."""
    from atod_fast.trainer.loading import teacher_location

    cache = tmp_path_factory.mktemp("cache")
    e = {**os.environ, "ATOD_FAST_CACHE": str(cache), "OMP_NUM_THREADS": "1",
         "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                str(Path.home() / ".cache" / "atod-fast-torch-extensions"))}
    old = os.environ.get("ATOD_FAST_CACHE")
    os.environ["ATOD_FAST_CACHE"] = str(cache)
    try:
        teacher_location(load_train_config(None, TINY), progress=False)
    finally:
        if old is None:
            del os.environ["ATOD_FAST_CACHE"]
        else:
            os.environ["ATOD_FAST_CACHE"] = old
    return e


def torchrun(env: dict, out: Path, nproc: int, *args: str, timeout: int = 300) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    missing = [r for r in range(nproc) if not (out / f"done-rank{r}").is_file()]
    assert not missing, f"ranks {missing} did not finish (exit {res.returncode}):\n{res.stdout[-4000:]}\n" \
                        f"{res.stderr[-8000:]}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def loss_runs(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    torchrun(env, root / "p1", 1, "losses", str(root / "p1"), "none,ddp,zero2,zero3", "--", *TINY)
    torchrun(env, root / "p2", 2, "losses", str(root / "p2"), "ddp,zero2,zero3", "--", *TINY)
    return {n: json.loads((root / n / "losses.json").read_text()) for n in ("p1", "p2")}, root


@needs_ds
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_two_processes_equal_one_with_the_same_global_batch(loss_runs, engine):
    runs, root = loss_runs
    one, two, plain = runs["p1"][engine], runs["p2"][engine], runs["p1"]["none"]
    for ref, got in ((plain, one), (one, two)):
        for a, b in zip(ref, got, strict=True):
            assert a["skipped_updates"] == b["skipped_updates"] == 0
            for k in ("loss", "distill", "pg", "value_loss", "entropy", "grad_norm"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (engine, k, a[k], b[k])
    w1, w2 = _weights(root / "p1" / f"weights-{engine}.safetensors"), _weights(root / "p2" / f"weights-{engine}"
                                                                              ".safetensors")
    w0 = _weights(root / "p1" / "weights-none.safetensors")
    assert set(w1) == set(w2) == set(w0)
    for k in w0:
        assert torch.allclose(w1[k], w0[k], atol=1e-5, rtol=0), k
        assert torch.allclose(w2[k], w1[k], atol=1e-5, rtol=0), k


@pytest.fixture(scope="module")
def zero3_runs(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    args = ["--max-steps", "2", *TINY, "distributed.engine=deepspeed", "distributed.zero_stage=3",
            "distributed.zero3_persistence_threshold=0"]
    torchrun(env, root / "full", 2, "cli", str(root / "full"), "--", "train", "--output-dir", str(root / "full/run"),
             *args)
    step1 = root / "full/run/checkpoints/step-000001"
    torchrun(env, root / "resumed", 2, "cli", str(root / "resumed"), "--", "train", "--output-dir",
             str(root / "resumed/run"), "--resume", str(step1), *args)
    return root


@needs_ds
def test_zero3_train_writes_one_log_and_a_plain_hf_export(zero3_runs):
    from transformers import AutoModelForCausalLM

    from atod_fast.trainer.metrics import read_metrics
    from atod_fast.trainer.models import ValueHead, load_value_head

    run = zero3_runs / "full/run"
    assert [m["step"] for m in read_metrics(run)] == [1, 2]  # rank 0 alone writes it
    ckpt = run / "checkpoints/step-000002"
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    lm = AutoModelForCausalLM.from_pretrained(ckpt / "student")  # a plain model, no DeepSpeed
    state = _weights(ckpt / "student" / "model.safetensors")
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert all(v.numel() > 0 for v in state.values())  # consolidated, not shards
    head = ValueHead(lm.config.hidden_size)
    load_value_head(head, ckpt / "value_head.safetensors")  # strict load_state_dict
    assert (run / "eval.json").is_file()


@pytest.fixture(scope="module", params=["ddp", pytest.param("zero2", marks=needs_ds)])
def cli_run(request, env, tmp_path_factory):
    """``atod-fast train`` end to end under the other engines (ZeRO-3 has its own fixture above)."""
    engine = request.param
    root = tmp_path_factory.mktemp(f"cli-{engine}")
    dist = ["distributed.engine=ddp"] if engine == "ddp" else ["distributed.engine=deepspeed",
                                                               "distributed.zero_stage=2"]
    torchrun(env, root, 2, "cli", str(root), "--", "train", "--output-dir", str(root / "run"), "--max-steps", "2",
             *TINY, *dist)
    return root / "run"


def test_train_end_to_end_under_ddp_and_zero2(cli_run):
    from transformers import AutoModelForCausalLM

    from atod_fast.trainer.metrics import read_metrics

    rows = read_metrics(cli_run)
    assert [m["step"] for m in rows] == [1, 2]
    assert all(m["skipped_updates"] == 0 for m in rows)
    ckpt = cli_run / "checkpoints/step-000002"
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    AutoModelForCausalLM.from_pretrained(ckpt / "student")
    assert (cli_run / "eval.json").is_file()


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=needs_ds)])
def test_lora_student_trains_under_two_processes(env, tmp_path, engine):
    from atod_fast.trainer.metrics import read_metrics

    dist = ["distributed.engine=ddp"] if engine == "ddp" else ["distributed.engine=deepspeed",
                                                               "distributed.zero_stage=2"]
    lora = ["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]", "eval.at_end=false", "optim.lr=1e-2"]
    torchrun(env, tmp_path, 2, "cli", str(tmp_path), "--", "train", "--output-dir", str(tmp_path / "run"),
             "--max-steps", "2", *TINY, *dist, *lora)
    rows = read_metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == [1, 2] and all(m["skipped_updates"] == 0 for m in rows)
    a = [_weights(tmp_path / f"run/checkpoints/step-00000{s}/student/adapter_model.safetensors") for s in (1, 2)]
    assert a[0].keys() == a[1].keys() and any(not torch.equal(a[0][k], a[1][k]) for k in a[0])


def test_lora_is_refused_under_zero3():
    from atod_fast.trainer.loop import Trainer

    cfg = load_train_config(None, ["model.lora.r=4", "distributed.engine=deepspeed", "distributed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"model\.lora\.r: LoRA students are not supported with "
                                          r"distributed\.zero_stage=3"):
        Trainer(cfg)


@needs_ds
def test_resume_from_a_zero3_checkpoint_continues_exactly(zero3_runs):
    a = zero3_runs / "full/run/checkpoints/step-000002"
    b = zero3_runs / "resumed/run/checkpoints/step-000002"
    for f in ("student/model.safetensors", "value_head.safetensors"):
        wa, wb = _weights(a / f), _weights(b / f)
        assert set(wa) == set(wb)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (f, k)


def test_distributed_config_errors():
    with pytest.raises(ConfigError, match=r"distributed.engine"):
        load_train_config(None, ["distributed.engine=fsdp"])
    with pytest.raises(ConfigError, match=r"distributed.zero_stage"):
        load_train_config(None, ["distributed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"distributed.offload_optimizer"):
        load_train_config(None, ["distributed.engine=ddp", "distributed.offload_optimizer=true"])
    with pytest.raises(ConfigError, match=r"distributed.offload_param"):
        load_train_config(None, ["distributed.engine=deepspeed", "distributed.zero_stage=2",
                                 "distributed.offload_param=true"])
    with pytest.raises(ConfigError, match=r"rollout.engine"):
        load_train_config(None, ["rollout.engine=sglang"])


def test_deepspeed_config_follows_ours():
    from atod_fast.trainer.distributed import deepspeed_config

    cfg = load_train_config(None, ["distributed.engine=deepspeed", "distributed.zero_stage=3",
                                   "distributed.offload_optimizer=true", "distributed.zero3_persistence_threshold=0"])
    ds = deepspeed_config(cfg.distributed, max_grad_norm=1.0, device=torch.device("cpu"), world=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 2


def test_grpo_with_groups_across_ranks_trains(env, tmp_path):
    """ppo.advantage=grpo with groups of 3 over 6 episodes under DDP: each group spans both ranks (rank r plays
    episodes r, r + 2, ...), so the advantages gather every rank's returns (the arithmetic is checked against one
    process in test_grpo.py); the run trains, one log, no value loss."""
    import math

    from atod_fast.trainer.metrics import read_metrics

    run = tmp_path / "run"
    torchrun(env, tmp_path, 2, "cli", str(tmp_path), "--", "train", "--max-steps", "2", *TINY, "ppo.advantage=grpo",
             "rollout.group_size=3", "schedule.handover=fixed", "eval.at_end=false", "distributed.engine=ddp",
             "--output-dir", str(run))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["value_loss"] == 0 and math.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in rows)
