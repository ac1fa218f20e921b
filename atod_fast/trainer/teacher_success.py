"""The teacher's success on training-distribution episodes: the bar of the hand-over gate.

Measured once per teacher and rollout setting, on seeds of their own (``seeds.probe_seeds``:
disjoint from every training, evaluation and demonstration seed), sampled the way training
rollouts are (``rollout.*``, at ``rollout.temperature``), and cached as JSON: beside the teacher
for the built-in one (its folder is keyed by its recipe), else under ``$ATOD_FAST_CACHE``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .config import BUILTIN, TrainConfig, config_hash
from .evaluation import evaluate_model
from .seeds import probe_seeds

log = logging.getLogger("atod_fast")

PROBE_EPISODES = 512
"""Episodes the teacher plays for the gate (binomial s.e. ≤ 0.022)."""

_VERSION = 1


def probe_settings(cfg: TrainConfig, teacher_path: str) -> dict:
    """Everything the measured number depends on (the cache key)."""
    r = cfg.rollout
    return {"teacher": str(teacher_path), "env": cfg.env.name, "env_kwargs": cfg.env.resolved_kwargs(),
            "max_turns": r.max_turns, "max_new_tokens": r.max_new_tokens, "max_episode_tokens": r.max_episode_tokens,
            "temperature": r.temperature, "chat_template": cfg.model.chat_template, "episodes": PROBE_EPISODES,
            "v": _VERSION}


def cache_file(cfg: TrainConfig, teacher_path: str) -> Path:
    from .sft import cache_dir

    key = config_hash(probe_settings(cfg, teacher_path))
    if cfg.model.teacher == BUILTIN:
        return Path(teacher_path) / f"train_success-{key}.json"
    return cache_dir() / "teacher-success" / f"{key}.json"


def teacher_train_success(cfg: TrainConfig, teacher, tokenizer, teacher_path: str, device: torch.device) -> float:
    """The teacher's training-distribution success rate, from the cache or measured (then cached atomically)."""
    path = cache_file(cfg, teacher_path)
    if path.is_file():
        return float(json.loads(path.read_text())["success_rate"])
    t0 = time.perf_counter()
    r = cfg.rollout
    res = evaluate_model(teacher, tokenizer, env_name=cfg.env.name, env_kwargs=cfg.env.resolved_kwargs(),
                         episodes=PROBE_EPISODES, max_turns=r.max_turns, max_new_tokens=r.max_new_tokens,
                         max_episode_tokens=r.max_episode_tokens, temperature=r.temperature, device=device,
                         chat_template=cfg.model.chat_template, step_timeout_s=cfg.env.step_timeout_s,
                         seeds=probe_seeds(PROBE_EPISODES))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**res, "settings": probe_settings(cfg, teacher_path)}, indent=2))
    os.replace(tmp, path)
    log.info("teacher's training-distribution success %.3f on %d episodes (%.1fs); cached at %s",
             res["success_rate"], PROBE_EPISODES, time.perf_counter() - t0, path)
    return float(res["success_rate"])
