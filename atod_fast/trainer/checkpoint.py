"""Atomic checkpoints: a run killed at any moment resumes from the newest complete one.

Layout of ``RUN/checkpoints/step-000040/``::

    student/                 the student LM (transformers format, safetensors) and its tokenizer
    value_head.safetensors   the value head
    trainer_state.pt         optimizer, LR scheduler, RNG states, step, counters
    deepspeed/               DeepSpeed's own checkpoint (engine=deepspeed: sharded weights and optimizer)
    rng/rank-R.pt            RNG states of every rank (distributed runs)
    config.yaml              the run's resolved config
    meta.json                step and max_steps at save time

``student/`` and ``value_head.safetensors`` are always complete, plain files (consolidated from
ZeRO-3 shards when needed): ``atod-fast eval`` and ``transformers`` load them as they are.

A checkpoint is written into a hidden temporary directory, every file is fsynced, then the
directory is renamed into place (atomic on POSIX) and its parent fsynced. Only names
``step-NNNNNN`` are complete checkpoints; anything else under ``checkpoints/`` is debris of an
interrupted save and is removed on the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^step-(\d{6,})$")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "meta.json").is_file()]
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(run_dir: Path, step: int, *, policy, tokenizer, engine, dist, scheduler, config_yaml: str,
                    state: dict, max_steps: int, keep_last: int) -> Path:
    """Every rank calls this (DeepSpeed saves its shards collectively); rank 0 writes the rest and renames."""
    from .models import save_value_head

    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for p in root.iterdir():  # debris of interrupted saves or deletions
            if not _NAME.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    full = engine.full_state_dict() if engine.zero3 else None  # a collective under ZeRO-3
    if dist.is_main:
        export_student(policy, tmp, full)
        tokenizer.save_pretrained(tmp / "student")
        if full is None:
            save_value_head(policy.value_head, tmp / "value_head.safetensors")
    engine.save_engine_state(tmp / "deepspeed")
    if dist.enabled:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{dist.rank}.pt")
    if dist.is_main:
        torch.save({"optimizer": engine.optimizer_state(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "step": step, **state}, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    dist.barrier()
    if dist.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "max_steps": max_steps, "world_size": dist.world,
                                                   "engine": dist.cfg.engine}))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (resumed after a kill between rename and cleanup)
            _retire(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            _retire(old)
    dist.barrier()
    return final


def export_student(policy, ckpt: Path, full_state: dict | None = None) -> None:
    """The student as a plain HF folder (``ckpt/student``) and its value head (``ckpt/value_head.safetensors``).

    ``full_state``: the policy's consolidated state dict (keys ``lm.*``, ``value_head.*``) when
    the live parameters are shards (ZeRO-3); null: the live module is complete.
    """
    from safetensors.torch import save_file

    if full_state is None:
        policy.lm.save_pretrained(ckpt / "student", safe_serialization=True)
        return
    lm_sd = {k[3:]: v for k, v in full_state.items() if k.startswith("lm.")}
    policy.lm.save_pretrained(ckpt / "student", state_dict=lm_sd, safe_serialization=True)
    vh = {k[len("value_head."):]: v.detach().cpu().float().contiguous() for k, v in full_state.items()
          if k.startswith("value_head.")}
    save_file(vh, str(ckpt / "value_head.safetensors"))


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    p = ckpt / "rng" / f"rank-{rank}.pt"
    return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None


def _retire(path: Path) -> None:
    # Rename first, so a kill during deletion never leaves a half-deleted "complete" checkpoint.
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"--checkpoint: no checkpoint found at {path} (expected a step-NNNNNN directory or a run "
                         "directory holding checkpoints/)")
    return latest
