"""Held-out evaluation: success rate and mean reward on seeds no training run ever uses.

Owns how a model is evaluated (``evaluate_model``), the settings a run's config gives it (``eval_kwargs``) and
the teacher / student-before / student-after comparison (``compare``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import envs as envs_mod
from .config import TrainConfig
from .rollout import ChatFormat, play, rollout_stats, stop_token_ids
from .seeds import eval_seeds
from .threads import decode_threads, torch_threads

EVAL_SAMPLING_SEED = 20_240_601
_BATCH = 128


def evaluate_model(lm, tokenizer, *, env_name: str, env_kwargs: dict, episodes: int, max_turns: int | None,
                   max_new_tokens: int, max_episode_tokens: int, temperature: float, device: torch.device,
                   chat_template: str | None = None, step_timeout_s: float | None = None,
                   seeds: list[int] | None = None) -> dict:
    """Play ``episodes`` held-out episodes; returns success_rate, reward_mean, episodes and more.

    Sampling uses its own fixed seed (the global RNG state is left untouched), so two
    evaluations of the same model agree exactly. ``seeds``: other environment seeds than the
    held-out ones (as many as ``episodes``).
    """
    fmt = ChatFormat(tokenizer, stop_token_ids(lm, tokenizer), chat_template)
    if seeds is None:
        seeds = eval_seeds(episodes)
    elif len(seeds) != episodes:
        raise ValueError(f"seeds: expected {episodes} seeds, got {len(seeds)}")
    trajs = []
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SAMPLING_SEED)
        for i in range(0, episodes, _BATCH):
            chunk = seeds[i:i + _BATCH]
            envs = [envs_mod.make(env_name, step_timeout_s=step_timeout_s, **env_kwargs) for _ in chunk]
            turns = max_turns if max_turns is not None else envs[0].max_turns
            trajs += play(lm, tokenizer, fmt, envs, chunk, max_turns=turns, max_new_tokens=max_new_tokens,
                          max_episode_tokens=max_episode_tokens, temperature=temperature, device=device)
    stats = rollout_stats(trajs)
    return {"success_rate": stats["success_rate"], "reward_mean": stats["reward_mean"], "episodes": episodes,
            "turns_mean": stats["turns_mean"], "invalid_rate": stats["invalid_rate"],
            "temperature": temperature}


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table of success rate and mean reward per model."""
    lines = ["| model | success rate | mean reward | mean turns | episodes |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['success_rate']:.3f} | {r['reward_mean']:.3f} | {r['turns_mean']:.2f} | "
                     f"{r['episodes']} |")
    return "\n".join(lines)


def eval_kwargs(cfg: TrainConfig, device: torch.device, episodes: int) -> dict:
    """``evaluate_model``'s keyword arguments from a run's config."""
    r = cfg.rollout
    return dict(env_name=cfg.env.name, env_kwargs=cfg.env.resolved_kwargs(), episodes=episodes,
                max_turns=r.max_turns, max_new_tokens=r.max_new_tokens, max_episode_tokens=r.max_episode_tokens,
                temperature=cfg.eval.temperature, device=device, chat_template=cfg.model.chat_template,
                step_timeout_s=cfg.env.step_timeout_s)


def compare(cfg: TrainConfig, student_lm, tokenizer, teacher, teacher_path, device, *, episodes: int,
            student_name: str = "student-after") -> dict:
    """Held-out success of teacher, the initial student and ``student_lm``."""
    from .loading import initial_student

    kw = eval_kwargs(cfg, device, episodes)
    rows = {}
    if teacher is not None:
        rows["teacher"] = evaluate_model(teacher, tokenizer, **kw)
    before, _ = initial_student(cfg, teacher_path)
    rows["student-before"] = evaluate_model(before.to(device), tokenizer, **kw)
    del before
    rows[student_name] = evaluate_model(student_lm, tokenizer, **kw)
    return rows


def heldout_metrics(cfg: TrainConfig, lm, tokenizer, device: torch.device) -> dict:
    """The ``heldout_*`` metrics of ``eval.every``: ``eval.episodes`` held-out episodes of the current student."""
    t0 = time.perf_counter()
    with torch_threads(decode_threads(cfg)):
        r = evaluate_model(lm, tokenizer, **eval_kwargs(cfg, device, cfg.eval.episodes))
    return {"heldout_success_rate": r["success_rate"], "heldout_reward_mean": r["reward_mean"],
            "heldout_s": time.perf_counter() - t0}


def final_evaluation(cfg: TrainConfig, run_dir: Path, student_lm, tokenizer, teacher, teacher_path,
                     device: torch.device) -> dict:
    """The end-of-run comparison (``eval.at_end``): written to ``run_dir/eval.json`` and printed as a table."""
    with torch_threads(decode_threads(cfg)):
        rows = compare(cfg, student_lm, tokenizer, teacher, teacher_path, device, episodes=cfg.eval.episodes)
    (run_dir / "eval.json").write_text(json.dumps(rows, indent=2))
    print(f"\nHeld-out evaluation ({cfg.eval.episodes} episodes of {cfg.env.name}, "
          f"temperature {cfg.eval.temperature}):\n")
    print(format_table(rows))
    return rows
