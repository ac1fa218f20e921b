"""Batched multi-turn rollouts: the student plays a batch of episodes against its environments.

One token sequence per episode: the chat-formatted first observation, then for each turn
the agent's tokens exactly as sampled (never re-tokenized) followed by the chat-formatted
next observation. Each turn is one batched call of the engine's sampler over the episodes still
running (the hf engine's: :class:`~atod_fast.trainer.decoding.KvCacheSampler`, whose KV cache
outlives the turn, or ``lm.generate``, whose cache does not). Per episode we record the
tokens, which ones the agent produced (``action_mask``), the turn index of every token, the
reward of every turn and how the episode ended (the trainer recomputes the sampled tokens'
log-probs in one pass over the packed episodes, so generation keeps no logits):

- ``done``: the environment ended it (terminal, no bootstrap);
- ``turn_limit`` / ``token_budget``: truncated by the rollout limits (GAE bootstraps);
- ``error``: the environment raised; the episode counts as failed and its traceback is logged.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger("atod_fast")

_PLACEHOLDER = "\u2063ATOD-ACTION\u2063"
CACHE_SIZE = 4096
"""Distinct observations whose token ids a :class:`ChatFormat` keeps."""


class ChatFormat:
    """Token ids of the chat template around observations, computed per turn.

    The text after the agent's turn is found by rendering a conversation whose assistant
    message is a placeholder: whatever the template writes after it (end-of-turn marker, the
    next user message, the generation prompt) is the observation's token span. When the agent
    itself ended its turn with the template's end-of-turn token, that token is not repeated.
    """

    def __init__(self, tokenizer, stop_ids: Sequence[int], chat_template: str | None = None):
        self.tok = tokenizer
        self.template = chat_template or tokenizer.chat_template
        if not self.template:
            raise ValueError("the tokenizer has no chat template; set model.chat_template")
        self.stop_ids = set(stop_ids)
        # Observations repeat ("Higher.", the same error message): each distinct one is rendered and tokenized once.
        self._first = functools.lru_cache(maxsize=CACHE_SIZE)(self._first_ids)
        self._after = functools.lru_cache(maxsize=CACHE_SIZE)(self._after_ids)

    def _render(self, messages, gen: bool) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=gen)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def first(self, observation: str) -> list[int]:
        """Tokens of the first observation, up to the agent's first turn."""
        return list(self._first(observation))

    def after_action(self, observation: str, ended_with: int | None) -> list[int]:
        """Tokens between the agent's last token and its next turn."""
        return list(self._after(observation, ended_with))

    def _first_ids(self, observation: str) -> tuple[int, ...]:
        return tuple(self._encode(self._render([{"role": "user", "content": observation}], True)))

    def _after_ids(self, observation: str, ended_with: int | None) -> tuple[int, ...]:
        text = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PLACEHOLDER},
                             {"role": "user", "content": observation}], True)
        if text.count(_PLACEHOLDER) != 1:
            raise ValueError("the chat template does not render an assistant message verbatim")
        suffix = text.split(_PLACEHOLDER, 1)[1]
        if ended_with is not None:
            stop_text = self.tok.decode([ended_with])
            if stop_text and suffix.startswith(stop_text):
                suffix = suffix[len(stop_text):]
        return tuple(self._encode(suffix))


@dataclass
class Trajectory:
    """One episode as a single token sequence."""

    seed: int
    tokens: list[int] = field(default_factory=list)
    action_mask: list[bool] = field(default_factory=list)
    turn_idx: list[int] = field(default_factory=list)
    """Turn of every token; observation tokens carry the index of the turn they lead into."""
    turn_rewards: list[float] = field(default_factory=list)
    turn_last_token: list[int] = field(default_factory=list)
    """Index in ``tokens`` of the last agent token of every turn (where its reward is placed)."""
    actions: list[str] = field(default_factory=list)
    end_reason: str = ""
    success: bool = False
    invalid_actions: int = 0
    error: str | None = None

    @property
    def reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def truncated(self) -> bool:
        return self.end_reason in ("turn_limit", "token_budget")

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    def _append(self, ids: Sequence[int], *, action: bool, turn: int):
        self.tokens += list(ids)
        self.action_mask += [action] * len(ids)
        self.turn_idx += [turn] * len(ids)


def stop_token_ids(lm, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def play(lm, tokenizer, fmt: ChatFormat, envs: Sequence, seeds: Sequence[int], *, max_turns: int,
         max_new_tokens: int, max_episode_tokens: int, temperature: float, device: torch.device,
         on_error=None, any_rank_active=None, generate=None, sample_keys: Sequence[int] | None = None,
         ) -> list[Trajectory]:
    """Play one episode per environment, batched over the episodes still running.

    ``temperature == 0`` decodes greedily. Sampling draws from torch's global generator:
    seed it before calling for reproducible rollouts.

    ``any_rank_active(bool) -> bool`` turns on synced generation for parameters sharded over
    ranks (ZeRO-3): every rank calls ``generate`` (``synced_gpus=True``) as many times as the
    rank with the longest episodes, on a one-token dummy batch once its own episodes are over.

    ``generate`` replaces ``lm.generate`` for the agent's turns (e.g. a vLLM engine,
    :mod:`atod_fast.trainer.vllm_rollout`): ``generate(prompts, *, episode_seeds, turn, stop_ids,
    max_new_tokens, temperature)`` gets one token list per running episode (the episode so far,
    never re-tokenized) and returns, in order, the sampled token ids of each episode: at most
    ``max_new_tokens`` of them, ending with a stop id when one was sampled. Its ``episode_seeds``
    are ``sample_keys`` (default: the environment seeds; episodes that share an environment seed
    need distinct keys to sample apart). Everything else
    (stop handling, bookkeeping, environment steps) is shared, so the trajectories have the
    same layout whichever engine samples.
    """
    from transformers import GenerationConfig

    if generate is not None and any_rank_active is not None:
        raise ValueError("play: generate and any_rank_active exclude each other (synced generation is for "
                         "lm.generate over sharded parameters)")
    stop = stop_token_ids(lm, tokenizer)
    pad = tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
        max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad,
    )
    trajs = [Trajectory(seed=s) for s in seeds]
    keys = list(seeds) if sample_keys is None else list(sample_keys)
    if len(keys) != len(trajs):
        raise ValueError(f"sample_keys: expected {len(trajs)} keys, one per episode, got {len(keys)}")
    for env, t, s in zip(envs, trajs, seeds, strict=True):
        t._append(fmt.first(env.reset(s)), action=False, turn=0)
    active = list(range(len(envs)))
    turn = 0
    was_training = lm.training
    lm.eval()
    synced = any_rank_active is not None
    while active or synced:
        for i in list(active):
            if len(trajs[i].tokens) + max_new_tokens > max_episode_tokens:
                trajs[i].end_reason = "token_budget"
                active.remove(i)
        if synced:
            if not any_rank_active(bool(active)):
                break
            if not active:  # keep the collectives of the ranks still generating company
                dummy = torch.full((1, 1), pad, dtype=torch.long, device=device)
                lm.generate(input_ids=dummy, attention_mask=torch.ones_like(dummy), generation_config=gen_cfg,
                            synced_gpus=True)
                turn += 1
                continue
        if not active:
            break
        if generate is None:
            outs = _hf_generate(lm, [trajs[i].tokens for i in active], gen_cfg, pad=pad, device=device,
                                synced=synced)
        else:
            outs = generate([list(trajs[i].tokens) for i in active], episode_seeds=[keys[i] for i in active],
                            turn=turn, stop_ids=stop, max_new_tokens=max_new_tokens, temperature=temperature)
            _check_generated(outs, len(active), max_new_tokens)
        active = [i for seq, i in zip(outs, active, strict=True)  # the episodes that go on
                  if _take_turn(trajs[i], envs[i], seq, stop, tokenizer, fmt, turn=turn, max_turns=max_turns,
                                on_error=on_error)]
        turn += 1
    if was_training:
        lm.train()
    return trajs


def _take_turn(t: Trajectory, env, seq: list[int], stop: Sequence[int], tokenizer, fmt: ChatFormat, *, turn: int,
               max_turns: int, on_error) -> bool:
    """Records the agent's sampled turn (cut after its first stop id), steps the environment with its text and
    appends the next observation; True while the episode goes on."""
    n, ended_with = len(seq), None
    for k, tok in enumerate(seq):
        if tok in stop:
            n, ended_with = k + 1, tok
            break
    t._append(seq[:n], action=True, turn=turn)
    t.turn_last_token.append(len(t.tokens) - 1)
    text = tokenizer.decode(seq[:n - 1] if ended_with is not None else seq[:n], skip_special_tokens=True)
    t.actions.append(text)
    try:
        obs, reward, done, info = env.step(text)
        reward = float(reward)
    except Exception as e:  # an environment bug must not stop training: the episode fails
        t.turn_rewards.append(0.0)
        t.end_reason, t.error = "error", "".join(traceback.format_exception(e))
        log.warning("environment %s raised in step() on seed %d, turn %d; the episode counts as failed:\n%s",
                    type(env).__name__, t.seed, turn, t.error)
        if on_error is not None:
            on_error(t)
        return False
    t.turn_rewards.append(reward)
    t.invalid_actions += bool(info.get("invalid", False))
    if done:
        t.end_reason, t.success = "done", bool(info.get("success", reward > 0))
        return False
    t._append(fmt.after_action(obs, ended_with), action=False, turn=turn + 1)
    if turn + 1 >= max_turns:
        t.end_reason = "turn_limit"
        return False
    return True


def _hf_generate(lm, prompts: list[list[int]], gen_cfg, *, pad: int, device: torch.device,
                 synced: bool) -> list[list[int]]:
    """One batched ``lm.generate`` (KV cache within the turn): the new token ids of every prompt."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        ids[row, width - lengths[row]:] = torch.tensor(p)
        mask[row, width - lengths[row]:] = 1
    out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                      **({"synced_gpus": True} if synced else {}))
    return out[:, width:].cpu().tolist()


def _check_generated(outs, n: int, max_new_tokens: int) -> None:
    if len(outs) != n:
        raise RuntimeError(f"generate returned {len(outs)} completions for {n} prompts")
    for ids in outs:
        if not 1 <= len(ids) <= max_new_tokens:
            raise RuntimeError(f"generate returned {len(ids)} tokens; expected 1 to max_new_tokens={max_new_tokens}")


def success_rewards(trajs: Sequence[Trajectory]) -> None:
    """``rollout.reward=success``: each episode's turn rewards become 0, but 1 at the last turn of an episode that
    succeeded (in place)."""
    for t in trajs:
        t.turn_rewards = [0.0] * len(t.turn_rewards)
        if t.success and t.turn_rewards:
            t.turn_rewards[-1] = 1.0


ROLLOUT_SUMS = ("episodes", "reward", "success", "turns", "invalid", "truncated", "errors", "tokens")


def rollout_sums(trajs: Sequence[Trajectory]) -> list[float]:
    """Sums over episodes (in ``ROLLOUT_SUMS`` order): what ranks add up before computing the stats."""
    return [float(len(trajs)), sum(t.reward for t in trajs), float(sum(t.success for t in trajs)),
            float(sum(t.num_turns for t in trajs)), float(sum(t.invalid_actions for t in trajs)),
            float(sum(t.truncated for t in trajs)), float(sum(t.end_reason == "error" for t in trajs)),
            float(sum(len(t.tokens) for t in trajs))]


def stats_from_sums(sums: Sequence[float]) -> dict[str, float]:
    s = dict(zip(ROLLOUT_SUMS, sums, strict=True))
    n = max(s["episodes"], 1)
    return {
        "reward_mean": s["reward"] / n,
        "success_rate": s["success"] / n,
        "turns_mean": s["turns"] / n,
        "invalid_rate": s["invalid"] / max(s["turns"], 1),
        "truncated_rate": s["truncated"] / n,
        "env_errors": s["errors"],
        "episode_tokens_mean": s["tokens"] / n,
    }


def rollout_stats(trajs: Sequence[Trajectory]) -> dict[str, float]:
    return stats_from_sums(rollout_sums(trajs))
