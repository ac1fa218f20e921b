"""Supervised warm-up on an environment's scripted expert; builds (and caches) the built-in teacher.

Demonstrations are tokenized exactly as rollouts are (the same per-turn chat formatting, the
agent's text followed by the end-of-turn token), so a model trained here sees at rollout time
the very token layout it was trained on. The loss is cross-entropy on the agent's tokens only.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import EnvConfig, SftConfig, SftRunConfig, config_hash
from .distributed import resolve_device
from .models import build_tokenizer, load_causal_lm, tiny_llama
from .rollout import ChatFormat, stop_token_ids
from .seeds import demo_seeds

log = logging.getLogger("atod_fast")

# Bump when the way the built-in teacher is made changes: cached teachers are rebuilt.
BUILTIN_TEACHER_VERSION = 2


def make_expert_env(env_cfg: EnvConfig, error_rate: float):
    env_cfg.make()  # bad env.kwargs are reported as such, not as a missing expert
    try:
        env = env_cfg.make(expert_error_rate=error_rate)
    except ValueError as e:
        raise ValueError(f"env.name={env_cfg.name!r} has no scripted expert with an error rate ({e}): set "
                         "model.teacher to a model") from None
    if not hasattr(env, "expert_action"):
        raise ValueError(f"env.name={env_cfg.name!r} has no scripted expert: set model.teacher to a model")
    return env


def expert_episodes(env_cfg: EnvConfig, n: int, error_rate: float, seed: int) -> list[tuple[str, list]]:
    """``n`` demonstrations: (first observation, [(action, observation, done), ...])."""
    env = make_expert_env(env_cfg, error_rate)
    out = []
    for s in demo_seeds(seed, n):
        first, turns = env.reset(s), []
        for _ in range(env.max_turns):
            action = env.expert_action()
            obs, _, done, _ = env.step(action)
            turns.append((action, obs, done))
            if done:
                break
        out.append((first, turns))
    return out


def demo_tokens(fmt: ChatFormat, tokenizer, eos: int, demo) -> tuple[list[int], list[bool]]:
    first, turns = demo
    ids, mask = fmt.first(first), None
    mask = [False] * len(ids)
    for action, obs, done in turns:
        a = tokenizer(action, add_special_tokens=False)["input_ids"] + [eos]
        ids += a
        mask += [True] * len(a)
        if not done:
            o = fmt.after_action(obs, eos)
            ids += o
            mask += [False] * len(o)
    return ids, mask


def run_sft(cfg: SftRunConfig, *, progress: bool = True) -> Path:
    """Train on expert demonstrations and save model + tokenizer to ``cfg.output_dir``."""
    from tqdm.auto import tqdm

    s = cfg.sft
    device = resolve_device(cfg.device)
    if cfg.init is None:  # a tiny model: threads only wait on each other
        torch.set_num_threads(1)
    demos = expert_episodes(cfg.env, s.episodes, s.expert_error_rate, cfg.seed)
    if cfg.init is None:
        corpus = [text for first, turns in demos for text in [first, *[t for a, o, _ in turns for t in (a, o)]]]
        tokenizer = build_tokenizer(corpus, s.vocab_size)
        model = tiny_llama(s.arch, tokenizer, seed=cfg.seed)
    else:
        model, tokenizer = load_causal_lm(cfg.init, dtype=cfg.model.dtype,
                                          trust_remote_code=cfg.model.trust_remote_code)
    model.to(device).train()
    stop = stop_token_ids(model, tokenizer)
    fmt = ChatFormat(tokenizer, stop, cfg.model.chat_template)
    eos = tokenizer.eos_token_id
    data = [demo_tokens(fmt, tokenizer, eos, d) for d in demos]

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warm = max(1, s.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k / s.steps, 1)))))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    bar = tqdm(range(s.steps), desc="sft", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for _ in bar:
        if len(order) < s.batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        batch, order = [data[i] for i in order[:s.batch_size]], order[s.batch_size:]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (x, m) in enumerate(batch):
            ids[r, :len(x)] = torch.tensor(x)
            att[r, :len(x)] = 1
            labels[r, :len(x)] = torch.where(torch.tensor(m), torch.tensor(x), -100)
        loss = model(input_ids=ids.to(device), attention_mask=att.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("sft: %d steps in %.1fs, last loss %.4f", s.steps, time.perf_counter() - t0, loss.item())

    out = Path(cfg.output_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sft_config.json").write_text(__import__("json").dumps(asdict(cfg), indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("ATOD_FAST_CACHE") or Path.home() / ".cache" / "atod-fast")


def builtin_teacher(env_cfg: EnvConfig, sft: SftConfig, *, seed: int = 0, device: str = "auto",
                    progress: bool = True) -> Path:
    """Path of the built-in teacher for this environment, trained with ``atod-fast sft`` on first use.

    Cached under ``$ATOD_FAST_CACHE`` (default ``~/.cache/atod-fast``), keyed by a hash of the
    environment, the SFT settings and the seed.
    """
    # The time limit does not change the demonstrations: leaving it out keeps teachers cached before it existed.
    env = {k: v for k, v in asdict(env_cfg).items() if k != "step_timeout_s"}
    key = config_hash({"env": env, "sft": asdict(sft), "seed": seed, "v": BUILTIN_TEACHER_VERSION})
    path = cache_dir() / "teachers" / f"{env_cfg.name}-{key}"
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the built-in teacher (SFT on the %s expert, error rate %.2f); cached at %s",
             env_cfg.name, sft.expert_error_rate, path)
    run_sft(SftRunConfig(output_dir=str(path), seed=seed, device=device, env=env_cfg, sft=sft), progress=progress)
    return path
