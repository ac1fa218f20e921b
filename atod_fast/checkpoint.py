"""Atomic checkpoints: a run killed at any moment resumes from the newest complete one.

Layout of ``RUN/checkpoints/step-000040/``::

    student/                 the student LM (transformers format, safetensors) and its tokenizer
    value_head.safetensors   the value head
    trainer_state.pt         optimizer, LR scheduler, RNG states, step, counters
    config.yaml              the run's resolved config
    meta.json                step and max_steps at save time

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


def save_checkpoint(run_dir: Path, step: int, *, policy, tokenizer, optimizer, scheduler, config_yaml: str,
                    state: dict, max_steps: int, keep_last: int) -> Path:
    from .models import save_value_head

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():  # debris of interrupted saves or deletions
        if not _NAME.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    policy.lm.save_pretrained(tmp / "student", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "student")
    save_value_head(policy.value_head, tmp / "value_head.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "step": step, **state}, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "max_steps": max_steps}))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (resumed after a kill between rename and cleanup)
        _retire(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        _retire(old)
    return final


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
