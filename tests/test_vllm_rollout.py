"""rollout.engine=vllm against a stand-in of vLLM's API (tests/fake_vllm.py): the glue, not vLLM itself.

The stand-in generates with a real transformers model built from the folder the trainer hands
to ``vllm.LLM`` (dummy-initialized, as ``load_format="dummy"`` does), so these tests check what
the glue controls: the engine arguments, the token prompts and sampling parameters of every
request, that trajectories keep their layout, and that the weight sync writes every student LM
parameter (and nothing else) before the first rollout and after every update.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys

import fake_vllm
import pytest
import torch
from rollout_cases import turn_spans

from atod_fast.cli import main
from atod_fast.envs import make
from atod_fast.trainer import vllm_rollout
from atod_fast.trainer.config import ConfigError, TinyArch, load_train_config
from atod_fast.trainer.models import tiny_llama
from atod_fast.trainer.rollout import ChatFormat, play, stop_token_ids
from atod_fast.trainer.vllm_rollout import VllmGenerator, WeightSyncExtension, export_config

TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=4", "rollout.max_turns=3", "eval.episodes=8",
    "logging.progress=false", "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def teacher_cache(private_cache):
    """The tiny built-in teacher (the built-in student takes its tokenizer from it), in a private cache."""
    from atod_fast.trainer.loading import teacher_location

    yield teacher_location(load_train_config(None, TINY), progress=False)


@pytest.fixture
def vllm_trainer(monkeypatch, teacher_cache, tmp_path):
    """A set-up Trainer with rollout.engine=vllm on the stand-in (its CUDA requirement lifted for the CPU)."""
    from atod_fast.trainer.loop import Trainer

    fake_vllm.install(monkeypatch)
    monkeypatch.setattr(vllm_rollout, "check_available", lambda device: None)
    cfg = load_train_config(None, [*TINY, "rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.4",
                                   f"output_dir={tmp_path / 'run'}"])
    tr = Trainer(cfg)
    tr.setup(progress=False)
    return tr


def _engine_weights() -> dict[str, torch.Tensor]:
    (llm,) = fake_vllm.INSTANCES
    return {n: p.detach().clone() for n, p in llm.hf.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _student(tr) -> dict[str, torch.Tensor]:
    """The student LM's weights as the engine stores them (bf16)."""
    return {n: p.detach().to(torch.bfloat16) for n, p in tr.models.policy.lm.named_parameters()}


def _check_trajectories_against_requests(trajs, requests, fmt, max_new_tokens):
    """Every agent turn is exactly one request, in play's order (turn by turn, running episodes in order): its
    prompt is the episode so far (token ids as they are, never re-tokenized) and the turn's tokens are the ids
    the engine sampled, cut after the first stop id."""
    assert len(requests) == sum(t.num_turns for t in trajs)
    it = iter(requests)
    spans = [turn_spans(t) for t in trajs]
    for k in range(max(t.num_turns for t in trajs)):
        for t, sp in zip(trajs, spans, strict=True):
            if t.num_turns <= k:
                continue
            s, e = sp[k]
            prompt, _, sampled = next(it)
            assert prompt == t.tokens[:s]
            assert t.tokens[s:e] == sampled and 1 <= e - s <= max_new_tokens
            assert sampled[-1] in fmt.stop_ids or len(sampled) == max_new_tokens
    for t, sp in zip(trajs, spans, strict=True):
        n = len(t.tokens)
        assert len(t.action_mask) == len(t.turn_idx) == n
        assert len(sp) == t.num_turns == len(t.actions) == len(t.turn_last_token) == len(t.turn_rewards)
        for k, (s, e) in enumerate(sp):
            assert t.turn_last_token[k] == e - 1 and set(t.turn_idx[s:e]) == {k}
        assert t.end_reason in ("done", "turn_limit", "token_budget")


# ------------------------------------------------------------------ the generator on its own
def test_engine_rollout_equals_hf_rollout_when_greedy(monkeypatch, tok_and_lm):
    """Greedy decoding through the engine (after one weight sync) gives the HF path's trajectories exactly.

    The tiny model's weights are scaled up so that its greedy replies vary (at the default init it
    answers every turn with the same special token)."""
    fake_vllm.install(monkeypatch)
    tok, _ = tok_and_lm
    lm = tiny_llama(TinyArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5, generator=gen)
    fmt = ChatFormat(tok, stop_token_ids(lm, tok))
    folder = export_config(lm, tok)
    gen = VllmGenerator.create(model=folder.name, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
                               seed=0, keep_alive=folder)
    (llm,) = fake_vllm.INSTANCES
    seeds = list(range(6))
    kw = dict(max_turns=4, max_new_tokens=6, max_episode_tokens=1024, temperature=0.0, device=torch.device("cpu"))
    engine = functools.partial(gen.generate, base_seed=7)
    hf = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, **kw)
    assert sum(t.num_turns for t in hf) > len(seeds), [t.actions for t in hf]  # several turns per episode
    assert any(a.strip() for t in hf for a in t.actions), [t.actions for t in hf]  # real guesses
    dummy = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, **kw, generate=engine)
    assert [t.tokens for t in dummy] != [t.tokens for t in hf]  # dummy weights until the first sync
    gen.sync_weights(lm.named_parameters())
    llm.requests.clear()
    ve = play(lm, tok, fmt, [make("guess_number") for _ in seeds], seeds, **kw, generate=engine)
    for a, b in zip(hf, ve, strict=True):
        for f in ("tokens", "action_mask", "turn_idx", "turn_rewards", "turn_last_token", "actions", "end_reason",
                  "success", "invalid_actions", "error"):
            assert getattr(a, f) == getattr(b, f), f
    _check_trajectories_against_requests(ve, llm.requests, fmt, 6)
    assert all(sp.temperature == 0.0 and sp.max_tokens == 6 for _, sp, _ in llm.requests)


def test_sync_gathers_each_parameter_while_it_is_sent(monkeypatch, tok_and_lm):
    """Under ZeRO-3 every parameter is handed over inside its own gathered context (and nothing outside one)."""
    fake_vllm.install(monkeypatch)
    tok, lm = tok_and_lm
    folder = export_config(lm, tok)
    gen = VllmGenerator.create(model=folder.name, dtype="float32", gpu_memory_utilization=0.3, max_model_len=256,
                               seed=0, keep_alive=folder)
    inside: list = []
    sent = []

    @contextlib.contextmanager
    def gathered(params):
        assert len(params) == 1 and not inside
        inside.append(params[0])
        yield
        inside.pop()

    load = gen._load

    def checked_load(weights):
        assert len(weights) == 1 and inside and weights[0][1].data_ptr() == inside[0].data_ptr()
        sent.append(weights[0][0])
        return load(weights)

    monkeypatch.setattr(gen, "_load", checked_load)
    names = gen.sync_weights(lm.named_parameters(), gathered=gathered)
    assert names == sent == [n for n, _ in lm.named_parameters()]
    assert _same(_engine_weights(), {n: p.detach() for n, p in lm.named_parameters()})


def test_parameters_the_sync_never_writes_are_reported(monkeypatch, tok_and_lm, caplog):
    fake_vllm.install(monkeypatch)
    tok, lm = tok_and_lm
    folder = export_config(lm, tok)
    gen = VllmGenerator.create(model=folder.name, dtype="float32", gpu_memory_utilization=0.3, max_model_len=256,
                               seed=0, keep_alive=folder)
    params = [(n, p) for n, p in lm.named_parameters() if "norm" not in n]
    with caplog.at_level(logging.WARNING, logger="atod_fast"):
        gen.sync_weights(params)
    assert "not written by the weight sync" in caplog.text and "norm" in caplog.text


# ------------------------------------------------------------------ inside the trainer
def test_trainer_rollout_through_the_engine(vllm_trainer):
    tr = vllm_trainer
    cfg = tr.cfg
    (llm,) = fake_vllm.INSTANCES
    a = llm.kwargs
    assert a["tensor_parallel_size"] == 1 and a["distributed_executor_backend"] == "external_launcher"
    assert a["gpu_memory_utilization"] == 0.4 and a["dtype"] == "bfloat16"
    assert a["max_model_len"] == cfg.rollout.max_episode_tokens and a["load_format"] == "dummy"
    assert "logprobs_mode" not in a  # no log-probs asked for: the trainer recomputes them
    assert issubclass(type(llm.worker), WeightSyncExtension)
    assert llm.hf.config.vocab_size == tr.models.policy.lm.config.vocab_size  # the student's architecture

    trajs = tr.rollout(1)
    requests = list(llm.requests)
    _check_trajectories_against_requests(trajs, requests, tr.rollout_engine.fmt, cfg.rollout.max_new_tokens)
    stop = stop_token_ids(tr.models.policy.lm, tr.models.tokenizer)
    for _, sp, _ in requests:
        assert sp.temperature == cfg.rollout.temperature and sp.max_tokens == cfg.rollout.max_new_tokens
        assert sp.stop_token_ids == stop and sp.logprobs is None and sp.detokenize is False
    seeds = [sp.seed for _, sp, _ in requests]
    assert len(set(seeds)) == len(seeds) and all(isinstance(s, int) for s in seeds)  # one per (episode, turn)

    # Same step, same episodes (the engine's own seeds); another step, other seeds.
    llm.requests.clear()
    again = tr.rollout(1)
    assert [t.tokens for t in again] == [t.tokens for t in trajs]
    assert [sp.seed for _, sp, _ in llm.requests] == seeds
    llm.requests.clear()
    tr.rollout(2)
    assert not set(seeds) & {sp.seed for _, sp, _ in llm.requests}

    # The trainer's own pass over these trajectories: targets are the engine's sampled tokens.
    _, data = tr.prepare(1, trajs)
    assert data["targets"].tolist() == [t.tokens[i] for t in trajs for i, a in enumerate(t.action_mask) if a]


def test_weights_are_synced_after_every_update(vllm_trainer):
    tr = vllm_trainer
    (llm,) = fake_vllm.INSTANCES
    lm_names = [n for n, _ in tr.models.policy.lm.named_parameters()]
    received = llm.worker.model_runner.model.received
    assert received == [lm_names]  # the initial sync: every LM parameter, HF names, no value head
    assert not any(n.startswith("value_head") or n.startswith("proj") for n in received[0])
    before = _student(tr)
    assert _same(_engine_weights(), before)
    assert llm.prefix_cache_resets == 1

    tr.step(1)
    after = _student(tr)
    assert not _same(before, after)  # the update moved the student ...
    assert _same(_engine_weights(), after)  # ... and the engine holds the updated weights
    assert received == [lm_names, lm_names] and llm.prefix_cache_resets == 2

    # A stale engine (sync skipped) would not pass that check.
    tr.rollout_engine.vllm.sync_weights = lambda *a, **k: []
    tr.step(2)
    assert not _same(_engine_weights(), _student(tr))


# ------------------------------------------------------------------ clear errors
def test_missing_vllm_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match=r"^rollout\.engine: vllm is not installed.*rollout\.engine=hf"):
        vllm_rollout.check_available(torch.device("cuda"))


def test_vllm_needs_cuda(monkeypatch):
    fake_vllm.install(monkeypatch)
    with pytest.raises(ConfigError, match=r"^rollout\.engine: vLLM generates on CUDA GPUs only.*cpu"):
        vllm_rollout.check_available(torch.device("cpu"))


def test_cli_refuses_vllm_without_it(monkeypatch, tmp_path, capsys):
    """Without vLLM (or on the CPU) train stops before building anything, with one line naming the key."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["train", "--output-dir", str(tmp_path / "run"), "rollout.engine=vllm", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rollout.engine" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_play_refuses_two_generation_modes(tok_and_lm):
    tok, lm = tok_and_lm
    with pytest.raises(ValueError, match="generate and any_rank_active"):
        play(lm, tok, ChatFormat(tok, stop_token_ids(lm, tok)), [make("guess_number")], [0], max_turns=1,
             max_new_tokens=2, max_episode_tokens=256, temperature=1.0, device=torch.device("cpu"),
             any_rank_active=lambda active: active, generate=lambda *a, **k: [])
