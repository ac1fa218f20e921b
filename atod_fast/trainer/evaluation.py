"""Held-out evaluation: success rate and mean reward on seeds no training run ever uses."""

from __future__ import annotations

import torch

from .. import envs as envs_mod
from .rollout import ChatFormat, play, rollout_stats, stop_token_ids
from .seeds import eval_seeds

EVAL_SAMPLING_SEED = 20_240_601
_BATCH = 128


def evaluate_model(lm, tokenizer, *, env_name: str, env_kwargs: dict, episodes: int, max_turns: int | None,
                   max_new_tokens: int, max_episode_tokens: int, temperature: float, device: torch.device,
                   chat_template: str | None = None, seeds: list[int] | None = None) -> dict:
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
            envs = [envs_mod.make(env_name, **env_kwargs) for _ in chunk]
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
