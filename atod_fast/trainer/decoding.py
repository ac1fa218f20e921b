"""Sampling the agent's turns with one KV cache per rollout, kept across turns.

An episode's token sequence only grows: each turn appends the agent's sampled tokens and the
next observation. ``lm.generate`` recomputes the whole prefix at every turn; :class:`KvCacheSampler`
keeps the keys and values of every episode from turn to turn and feeds only the tokens that are
new since (the last sampled token and the observation), then decodes token by token.

It samples what ``generate`` samples, from the same generator: float32 logits of the last
position, divided by the temperature when it is not 1, kept to the 50 likeliest tokens (what
``generate`` does with ``top_k=None``: its default, :data:`HF_TOP_K`), softmax, ``torch.multinomial`` over the
whole batch of the turn (finished episodes included, as ``generate`` does, so the generator
advances alike), greedy ``argmax`` at temperature 0, a row done at its first stop id, the turn
done when every row is or after ``max_new_tokens``. The logits themselves are the same up to
float rounding (other kernels and shapes see the same keys), so trajectories are identical
except in the rare draw that lands within rounding of a boundary between two tokens.

Rows of the cache hold holes: left padding of the new tokens and the tokens decoded after an
episode's stop id. The attention mask hides them and the position ids count real tokens only,
so every episode sees exactly its own sequence. Hence only architectures whose cache is plain
per-token keys and values over full attention qualify (:func:`supports_kv_reuse`); others keep
``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decode_step import decode_step, supports_decode_step
from .threads import torch_threads

HF_TOP_K = 50
"""``lm.generate`` fills the ``top_k=None`` that :func:`~atod_fast.trainer.rollout.play` passes with its default,
50: rollouts have always sampled from the 50 likeliest tokens, so this sampler does too."""

_FULL_ATTENTION = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo2")


def supports_kv_reuse(lm) -> bool:
    """True for decoder-only models with full attention and a per-token KV cache (no sliding window)."""
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or cfg.model_type not in _FULL_ATTENTION:
        return False
    window = getattr(cfg, "sliding_window", None)
    return window is None or getattr(cfg, "use_sliding_window", True) is False


def _plain_layers(cache) -> bool:
    """Every layer of ``cache`` a plain per-token key/value layer (what :func:`decode_step` extends)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class KvCacheSampler:
    """The ``generate`` callable of :func:`~atod_fast.trainer.rollout.play` for one rollout (one step).

    Episodes are told apart by their seeds; a call whose prompts do not extend what the cache
    holds starts a new cache. ``prefill_threads``: torch's threads while a turn's new tokens are fed (one
    batched pass), None: the caller's; the token-by-token steps run on the caller's.
    """

    def __init__(self, lm, *, pad: int, device: torch.device, prefill_threads: int | None = None):
        self.lm, self.pad, self.device = lm, pad, device
        self.lean = supports_decode_step(lm)  # its one-token steps skip transformers' per-call machinery
        self.prefill_threads = prefill_threads
        self._reset()

    def _reset(self) -> None:
        self.cache, self.seeds, self.fed = None, [], []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)

    def _align(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> None:
        """Keeps (in the order of ``seeds``) the cache rows of these episodes, or starts over."""
        row = {s: i for i, s in enumerate(self.seeds)}
        keep = [row.get(s) for s in seeds]
        if self.cache is None or None in keep or any(
                len(p) <= len(self.fed[r]) or list(p[:len(self.fed[r])]) != self.fed[r]
                for p, r in zip(prompts, keep, strict=True)):
            self._reset()
            self.seeds, self.fed = list(seeds), [[] for _ in seeds]
            self.mask = torch.zeros((len(seeds), 0), dtype=torch.long, device=self.device)
            return
        if keep != list(range(len(self.seeds))):
            idx = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(idx)
            self.mask = self.mask[idx]
            self.seeds, self.fed = [self.seeds[r] for r in keep], [self.fed[r] for r in keep]

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feeds ``ids [B, W]`` after the cache; the float32 logits of the last column ``[B, V]``."""
        self.mask = torch.cat([self.mask, new_mask], 1)
        pos = positions.clamp(min=0)
        if self.lean and ids.shape[1] == 1 and not self.lm.training and self.cache is not None \
                and _plain_layers(self.cache):
            return decode_step(self.lm, self.cache, ids, self.mask, pos).to(dtype=torch.float32)
        out = self.lm(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                      cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1].to(dtype=torch.float32)

    def _feed_new(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """The tokens of every episode not yet in the cache, left-padded to one width."""
        pending = [list(p[len(f):]) for p, f in zip(prompts, self.fed, strict=True)]
        width = max(len(p) for p in pending)
        ids = torch.full((len(pending), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(pending), width), dtype=torch.long)
        pos = torch.zeros((len(pending), width), dtype=torch.long)
        for r, p in enumerate(pending):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
            pos[r] = torch.arange(width) + len(self.fed[r]) - (width - len(p))
            self.fed[r] += p
        # A batched pass (every episode's new tokens at once): it gains from threads where a decode step would not.
        with torch_threads(self.prefill_threads or torch.get_num_threads()):
            return self._forward(ids.to(self.device), mask.to(self.device), pos.to(self.device))

    @torch.inference_mode()  # nothing here is differentiated: no autograd bookkeeping on the cache's tensors
    def __call__(self, prompts: Sequence[Sequence[int]], *, episode_seeds: Sequence[int], turn: int,
                 stop_ids: Sequence[int], max_new_tokens: int, temperature: float) -> list[list[int]]:
        self._align(prompts, episode_seeds)
        logits = self._feed_new(prompts)
        n = len(prompts)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        running = torch.ones(n, dtype=torch.bool, device=self.device)
        outs: list[list[int]] = [[] for _ in range(n)]
        for k in range(max_new_tokens):
            if temperature > 0:
                scores = logits if temperature == 1.0 else logits / temperature
                kth = torch.topk(scores, min(HF_TOP_K, scores.shape[-1]))[0][..., -1, None]
                scores = scores.masked_fill(scores < kth, -float("inf"))
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = torch.argmax(logits, dim=-1)
            nxt = torch.where(running, nxt, self.pad)
            was_running = running
            running = running & ~torch.isin(nxt, stop)
            toks, live = nxt.tolist(), was_running.tolist()
            for r in range(n):
                if live[r]:
                    outs[r].append(toks[r])
            if k == max_new_tokens - 1 or not running.any():
                break
            for r in range(n):  # the sampled token goes into the cache: part of the episode while it ran
                if live[r]:
                    self.fed[r].append(toks[r])
            pos = torch.tensor([len(f) - 1 for f in self.fed], dtype=torch.long, device=self.device)
            logits = self._forward(nxt[:, None], was_running.long()[:, None], pos[:, None])
        return outs
