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

``trainer_state.pt`` and ``rng/rank-R.pt`` hold only tensors and plain data (numbers, strings,
bools, None, lists, tuples, dicts): they are read with ``torch.load(weights_only=True)``, so a
checkpoint from elsewhere cannot run code when it is resumed. NumPy's and Python's RNG states,
which are not plain data, are stored as integer tensors. ``deepspeed/`` is read by DeepSpeed
itself, which unpickles without restriction: before it does, every name its files would import is
checked against the few classes DeepSpeed's own checkpoints hold.

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

from .config import ConfigError

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
    """The RNG states of torch, NumPy, Python and CUDA as tensors and plain data (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy, py = state["numpy"], state["python"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
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
        trainer_state = {"optimizer": engine.optimizer_state(), "scheduler": scheduler.state_dict(),
                         "rng": rng_state(), "step": step, **state}
        _check_plain(trainer_state, "trainer_state")
        torch.save(trainer_state, tmp / "trainer_state.pt")
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

    from .lora import is_lora, save_adapter

    lm_sd = None if full_state is None else {k[3:]: v for k, v in full_state.items() if k.startswith("lm.")}
    if is_lora(policy.lm):  # the adapter alone (peft's format): the base is rebuilt from the run's config
        save_adapter(policy.lm, ckpt / "student", base_name=policy.lm.config.name_or_path or None, state=lm_sd)
    else:
        policy.lm.save_pretrained(ckpt / "student", state_dict=lm_sd, safe_serialization=True)
    if full_state is None:
        return
    vh = {k[len("value_head."):]: v.detach().cpu().float().contiguous() for k, v in full_state.items()
          if k.startswith("value_head.")}
    save_file(vh, str(ckpt / "value_head.safetensors"))


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    p = ckpt / "rng" / f"rank-{rank}.pt"
    return _safe_load(p) if p.is_file() else None


def _retire(path: Path) -> None:
    # Rename first, so a kill during deletion never leaves a half-deleted "complete" checkpoint.
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state of ``ckpt``; with a ``deepspeed/`` folder, also checks DeepSpeed's files before DeepSpeed
    reads them (with its own, unrestricted loader)."""
    state = _safe_load(ckpt / "trainer_state.pt")
    if (ckpt / "deepspeed").is_dir():
        check_engine_files(ckpt / "deepspeed")
    return state


# The classes DeepSpeed's checkpoints pickle besides tensors and plain data (its ZeRO optimizer states, 0.19):
# the loss scaler, the ZeRO stage and the parameter-to-partition map. DeepSpeed unpickles its files without
# restriction, so a file that names any other class or function is refused before DeepSpeed opens it.
_DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def check_engine_files(root: Path) -> None:
    """Reads the names each pickle under ``root`` would import (nothing is unpickled) and refuses unknown ones."""
    for path in sorted(root.rglob("*.pt")):
        unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _DEEPSPEED_GLOBALS)
        if unknown:
            raise ConfigError(f"--resume: refusing to hand {path} to DeepSpeed: it refers to {', '.join(unknown[:3])}, "
                              "which DeepSpeed checkpoints never hold and which could run code when unpickled")


_PLAIN = (bool, int, float, str, type(None), torch.Tensor)


def _check_plain(obj, where: str) -> None:
    """Refuse to save what ``weights_only=True`` could not load back (found at save time, not at resume)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (int, str)):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}; expected int or str")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"checkpoint {where}: {type(obj).__name__} is not plain data; expected tensors, numbers, "
                        "strings, bools, None, or lists and dicts of them")


def _legacy_numpy_globals() -> list:
    # Checkpoints written before the RNG states became tensors hold NumPy's uint32 key array; reading it needs
    # NumPy's array reconstruction and nothing else (no arbitrary callables).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _safe_load(path: Path) -> dict:
    """``torch.load`` restricted to tensors and plain data: anything else is refused, never executed."""
    from pickle import UnpicklingError  # what torch's restricted loader raises; nothing here unpickles

    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "Python objects other than tensors and plain data"
        raise ConfigError(f"--resume: refusing to load {path}: it holds {what}, which could run code when "
                          "unpickled; atod-fast checkpoints hold only tensors and plain data") from None


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
