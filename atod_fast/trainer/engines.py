"""The rollout engine (``rollout.engine``): who samples the agent's turns of a step's episodes.

A :class:`RolloutEngine` plays this rank's share of a step's episodes (``rollout(step)``) and
is told after every update to take the student's new weights (``sync()``). Both engines share
:func:`~atod_fast.trainer.rollout.play` (environments, chat format, bookkeeping); they differ
in who generates:

- :class:`HfRolloutEngine` (``hf``): the student itself, through a KV cache kept across the turns
  (:class:`~atod_fast.trainer.decoding.KvCacheSampler`), or its own ``generate`` where that does not
  apply (synced over ranks under ZeRO-3, architectures other than plain full attention);
- :class:`VllmRolloutEngine` (``vllm``): a colocated vLLM engine that receives the student's weights.

Reproducibility: the episodes' seeds and the sampling seeds are derived from (seed, step, rank).
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch

from .config import BUILTIN, TrainConfig
from .decoding import KvCacheSampler, supports_kv_reuse
from .distributed import Dist
from .grpo import group_env_seeds, sample_keys
from .rollout import ChatFormat, Trajectory, play, stop_token_ids, success_rewards
from .seeds import step_seed
from .threads import batch_threads, decode_threads, torch_threads


@runtime_checkable
class RolloutEngine(Protocol):
    def rollout(self, step: int) -> list[Trajectory]:
        ...

    def sync(self) -> None:
        """After an update: the next rollout samples from the updated student."""
        ...


class HfRolloutEngine:
    """Rollouts with the student's ``generate``. ``engine``: the data-parallel engine (ZeRO-3 syncs generation)."""

    def __init__(self, cfg: TrainConfig, lm, tokenizer, *, max_turns: int, dist: Dist, engine,
                 device: torch.device):
        self.cfg, self.lm, self.tokenizer, self.max_turns = cfg, lm, tokenizer, max_turns
        self.dist, self.engine, self.device = dist, engine, device
        self.fmt = ChatFormat(tokenizer, stop_token_ids(lm, tokenizer), cfg.model.chat_template)

    def _generate(self, step: int):
        if self.engine.zero3 or not supports_kv_reuse(self.lm):
            return None  # lm.generate
        return KvCacheSampler(self.lm, pad=self.tokenizer.pad_token_id, device=self.device,
                              prefill_threads=batch_threads(self.cfg))

    def rollout(self, step: int) -> list[Trajectory]:
        cfg, d = self.cfg, self.dist
        # Rank r plays episodes r, r + world, ... of the step, sampling from its own generator; consecutive
        # groups of rollout.group_size episodes share an environment seed.
        n, g = cfg.rollout.episodes_per_step, cfg.group_size
        ids = list(range(n))[d.rank::d.world]
        seeds = group_env_seeds(cfg.seed, step, n, g)[d.rank::d.world]
        envs = [cfg.env.make() for _ in seeds]
        torch.manual_seed((step_seed(cfg.seed, step) + 1_000_003 * d.rank) % (1 << 62))
        generate = self._generate(step)
        r = cfg.rollout
        with torch_threads(decode_threads(cfg)):
            trajs = play(self.lm, self.tokenizer, self.fmt, envs, seeds, max_turns=self.max_turns,
                         max_new_tokens=r.max_new_tokens, max_episode_tokens=r.max_episode_tokens,
                         temperature=r.temperature, device=self.device,
                         any_rank_active=d.any if self.engine.zero3 and generate is None else None,
                         generate=generate, sample_keys=sample_keys(seeds, ids, g))
        if r.reward == "success":
            success_rewards(trajs)
        return trajs

    def sync(self) -> None:
        pass  # generates with the student itself


class VllmRolloutEngine(HfRolloutEngine):
    """Rollouts from one colocated vLLM engine on this rank's GPU, over the student's architecture.

    Its weights are the student's: written at construction (also those of a resumed checkpoint)
    and after every update.
    """

    def __init__(self, cfg: TrainConfig, lm, tokenizer, **kw):
        super().__init__(cfg, lm, tokenizer, **kw)
        from .vllm_rollout import VllmGenerator, export_config

        keep, model = None, cfg.model.student
        if model == BUILTIN:  # in memory only: vLLM reads its config and tokenizer from a folder
            keep = export_config(lm, tokenizer)
            model = keep.name
        # bf16 whatever model.dtype says: on CUDA the student's forwards run under bf16 autocast (or in bf16
        # weights), so that is the distribution it trains on; vLLM's attention kernels want 16-bit weights too.
        self.vllm = VllmGenerator.create(model=model, dtype="bfloat16",
                                         gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                                         max_model_len=cfg.rollout.max_episode_tokens,
                                         seed=(cfg.seed + self.dist.rank) % (1 << 31),
                                         trust_remote_code=cfg.model.trust_remote_code, keep_alive=keep)
        self.sync()

    def _generate(self, step: int):
        # each request seeded from (step, episode's sampling key, turn): ranks and group members differ by episode
        return functools.partial(self.vllm.generate, base_seed=step_seed(self.cfg.seed, step, salt=2))

    def sync(self) -> None:
        """The student LM's parameters (not the value head) into the vLLM engine."""
        self.vllm.sync_weights(self.lm.named_parameters(), gathered=self.engine.gathered if self.engine.zero3 else None)


def make_rollout_engine(cfg: TrainConfig, lm, tokenizer, **kw) -> RolloutEngine:
    """The engine ``rollout.engine`` names; keyword arguments as :class:`HfRolloutEngine` takes them."""
    cls = VllmRolloutEngine if cfg.rollout.engine == "vllm" else HfRolloutEngine
    return cls(cfg, lm, tokenizer, **kw)
