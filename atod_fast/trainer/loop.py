"""The ATOD trainer: rollouts with the student, then a PPO update with the λ-mixed ATOD loss.

One training step (``Trainer.step``):

1. play ``rollout.episodes_per_step`` episodes with the student (``rollout.play``);
2. one no-grad forward of student (log-probs under the loss's temperature, the PPO ratio's
   denominator, and values), teacher (last hidden states on agent tokens) and, with
   ``kl_coef > 0``, reference, over the episodes packed end to end (``atod_fast.packing``);
3. per-turn rewards on each turn's last agent token → ``compute_gae`` over the packed
   trajectories (truncated episodes bootstrap from the value after their last observation);
4. λ per agent token from the schedule at (step, turn index);
5. ``ppo.epochs`` × ``ppo.minibatches`` AdamW steps on ``atod_loss`` + a clipped value loss.

Reproducibility: the environment seeds, the sampling generator and the minibatch order of a
step are all derived from (seed, step), and checkpoints carry the optimizer and scheduler, so
a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes (on CPU).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ops.gae import compute_gae, masked_whiten
from ..ops.losses import atod_loss
from ..ops.schedule import AnnealSchedule
from .checkpoint import latest_checkpoint, load_rank_rng, load_trainer_state, read_meta, save_checkpoint, set_rng_state
from .config import BUILTIN, ConfigError, TrainConfig, incompatible_keys, load_train_config, to_yaml
from .distributed import Dist, make_engine, shard_teacher_zero3, whiten_global
from .evaluation import evaluate_model, format_table
from .grpo import GrpoEstimator, group_env_seeds, sample_keys
from .handover import HandoverController
from .metrics import MetricsWriter
from .models import Policy, check_same_tokenizer, decoder_of, freeze, lm_head, load_causal_lm, tiny_llama
from .packing import Packed, last_hidden_states, pack
from .rollout import ChatFormat, Trajectory, play, rollout_sums, stats_from_sums, stop_token_ids
from .seeds import step_seed

log = logging.getLogger("atod_fast")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def set_cpu_threads(n: int | None, *, tiny: bool) -> None:
    if n is not None:
        torch.set_num_threads(n)
    elif tiny:
        torch.set_num_threads(1)


def build_schedule(cfg: TrainConfig, turn_horizon: int) -> AnnealSchedule:
    s = cfg.schedule
    total = s.total_steps or cfg.max_steps
    horizon = s.turn_horizon or turn_horizon
    if s.mode == "opd":
        return AnnealSchedule.opd(total, horizon)
    if s.mode == "rl":
        return AnnealSchedule.rl(total, horizon)
    return AnnealSchedule(total, horizon, lambda_max=s.lambda_max, lambda_min=s.lambda_min,
                          time_decay=s.time_decay, turn_decay=s.turn_decay)


class FixedLambda:
    """λ from an AnnealSchedule from step 0 (handover=fixed, opd, rl): the controller interface, nothing to learn."""

    def __init__(self, schedule: AnnealSchedule):
        self.schedule = schedule
        self.lambda_max, self.turn_horizon = schedule.lambda_max, schedule.turn_horizon

    def lam(self, step: int, turn_idx: torch.Tensor) -> torch.Tensor:
        return self.schedule(step - 1, turn_idx)

    def observe(self, step: int, stats: dict) -> None:
        pass

    def value_only(self, step: int) -> bool:
        return False

    def lr_factor(self, step: int) -> float:
        return 1.0

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _lr_lambda(cfg: TrainConfig, factor=lambda step: 1.0):
    """LR multiplier after k finished steps (for step k + 1), times ``factor(k + 1)`` (the hand-over's scale)."""
    o, total = cfg.optim, cfg.max_steps

    def base(k: int) -> float:
        if k < o.warmup_steps:
            return (k + 1) / o.warmup_steps
        if o.lr_schedule == "constant":
            return 1.0
        p = min((k - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
        decay = 1.0 - p if o.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay

    return lambda k: base(k) * factor(k + 1)


@dataclass
class Models:
    policy: Policy
    tokenizer: object
    teacher: torch.nn.Module | None
    reference: torch.nn.Module | None


def initial_student(cfg: TrainConfig, teacher_path: str | None):
    """(lm, tokenizer) of the student before training: rebuilt identically on every call."""
    if cfg.model.student == BUILTIN:
        if teacher_path is None:
            raise ConfigError("model.student: the built-in student takes its tokenizer from the built-in teacher; "
                              "set model.teacher=builtin or name a student model")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher_path)
        return tiny_llama(cfg.model.student_arch, tok, seed=cfg.seed), tok
    return load_causal_lm(cfg.model.student, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                          attn_implementation=cfg.model.attn_implementation)


def teacher_location(cfg: TrainConfig, *, progress: bool) -> str | None:
    t = cfg.model.teacher
    if t is None:
        return None
    if t == BUILTIN:
        from .sft import builtin_teacher

        return str(builtin_teacher(cfg.env, cfg.sft, device=cfg.device, progress=progress))
    return t


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; ``train()`` runs it."""

    def __init__(self, cfg: TrainConfig, *, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.dist = Dist(cfg.distributed)
        self.device = self.dist.device(cfg.device)
        if cfg.rollout.episodes_per_step < self.dist.world:
            raise ConfigError(f"rollout.episodes_per_step: expected at least one episode per rank (>= "
                              f"{self.dist.world}), got {cfg.rollout.episodes_per_step}")
        if cfg.rollout.engine == "vllm":
            from .vllm_rollout import check_available

            check_available(self.device)
        self.dist.init(self.device)
        self.resume_from = self._find_resume(resume)
        self.start_step = 0
        self.nonfinite_streak = 0
        self.vllm = None

    # ----------------------------------------------------------------- setup
    def _find_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            if latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(f"--output-dir: {self.run_dir} already holds checkpoints; pass --resume auto to "
                                  "continue that run, or choose another output directory")
            return None
        ckpt = latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if resume == "auto" and ckpt is None:
            return None  # nothing to resume: a fresh run
        if ckpt is None or not (ckpt / "meta.json").is_file():
            raise ConfigError(f"--resume: {resume} is not a complete checkpoint directory")
        saved = load_train_config(str(ckpt / "config.yaml"))
        bad = incompatible_keys(saved, self.cfg)
        if bad:
            raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(bad)}; "
                              f"resume with the saved config ({ckpt / 'config.yaml'}) or start a new output dir")
        world = read_meta(ckpt).get("world_size", 1)
        if world != self.dist.world:
            raise ConfigError(f"--resume: {ckpt} was written by {world} process(es), this run has {self.dist.world}; "
                              "each rank plays its own episodes and holds its own shard, so resume on as many")
        return ckpt

    def setup(self, *, progress: bool = True) -> None:
        cfg = self.cfg
        set_cpu_threads(cfg.cpu_threads, tiny=cfg.model.student == BUILTIN and cfg.model.teacher in (BUILTIN, None))
        with self.dist.main_first():  # one rank builds the built-in teacher, the others read the cache
            self.teacher_path = teacher_location(cfg, progress=progress and self.dist.is_main)
        lm, tok = initial_student(cfg, self.teacher_path)
        if cfg.model.liger:
            from .models import apply_liger

            apply_liger(lm)
        teacher = None
        if self.teacher_path is not None:
            teacher, t_tok = load_causal_lm(self.teacher_path, dtype=cfg.model.dtype,
                                            trust_remote_code=cfg.model.trust_remote_code,
                                  attn_implementation=cfg.model.attn_implementation)
            check_same_tokenizer(tok, t_tok, cfg.model.student, self.teacher_path, "teacher")
            teacher = freeze(teacher)
            if cfg.distributed.teacher_zero3:
                teacher = shard_teacher_zero3(teacher, cfg.distributed, self.device, self.dist.world)
            else:
                teacher = teacher.to(self.device)
        reference = None
        if cfg.loss.kl_coef > 0:
            if cfg.model.reference is None:
                reference = copy.deepcopy(lm)
            else:
                reference, r_tok = load_causal_lm(cfg.model.reference, dtype=cfg.model.dtype,
                                                  trust_remote_code=cfg.model.trust_remote_code,
                                  attn_implementation=cfg.model.attn_implementation)
                check_same_tokenizer(tok, r_tok, cfg.model.student, cfg.model.reference, "reference")
            reference = freeze(reference).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            policy = Policy(lm)
        if self.resume_from is not None and cfg.distributed.engine != "deepspeed":
            self._load_weights(policy, self.resume_from)
        policy.to(self.device).train()
        self.models = Models(policy, tok, teacher, reference)
        self.fmt = ChatFormat(tok, stop_token_ids(lm, tok), cfg.model.chat_template)
        probe = cfg.env.make()
        self.max_turns = cfg.rollout.max_turns or probe.max_turns
        self.lam_ctl = self._build_lambda(teacher, tok)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, self.lam_ctl.lr_factor))
        self.engine = make_engine(cfg.distributed, policy, self.optimizer, max_grad_norm=o.max_grad_norm,
                                  device=self.device, world=self.dist.world)
        if self.resume_from is not None:
            st = load_trainer_state(self.resume_from)
            self.engine.load_engine_state(self.resume_from / "deepspeed", st)
            self.scheduler.load_state_dict(st["scheduler"])
            set_rng_state(load_rank_rng(self.resume_from, self.dist.rank) or st["rng"])
            self.start_step = st["step"]
            self.nonfinite_streak = st.get("nonfinite_streak", 0)
            self.lam_ctl.load_state_dict(st.get("lam", {}))
        w_s, _ = lm_head(lm)
        self.vocab_size = None
        if teacher is not None and lm_head(teacher)[0].shape[0] != w_s.shape[0]:
            self.vocab_size = len(tok)  # heads padded to different sizes over one tokenizer
        if cfg.rollout.engine == "vllm":
            self.vllm = self._build_vllm(lm, tok)
            self.sync_vllm()  # also brings in the weights of a resumed checkpoint

    def _build_lambda(self, teacher, tok):
        cfg, s = self.cfg, self.cfg.schedule
        if not cfg.gated:
            return FixedLambda(build_schedule(cfg, self.max_turns))
        if cfg.distributed.teacher_zero3:
            raise ConfigError("schedule.handover: auto measures the teacher on one rank, which a ZeRO-3 sharded "
                              "teacher cannot do; set schedule.handover=fixed with distributed.teacher_zero3")
        from .teacher_success import teacher_train_success

        with self.dist.main_first():  # rank 0 measures and caches, the others read the cache
            bar = teacher_train_success(cfg, teacher, tok, self.teacher_path, self.device)
        return HandoverController(turn_horizon=s.turn_horizon or self.max_turns, max_steps=cfg.max_steps,
                                  teacher_success=bar, lambda_max=s.lambda_max, lambda_min=s.lambda_min,
                                  time_decay=s.time_decay, turn_decay=s.turn_decay, anneal_steps=s.anneal_steps,
                                  gate_window=s.gate_window, gate_ratio=s.gate_ratio,
                                  gate_divergence=s.gate_divergence, lr_scale=cfg.optim.handover_lr_scale,
                                  value_warmup_steps=cfg.ppo.value_warmup_steps)

    def _build_vllm(self, lm, tok):
        """One colocated vLLM engine on this rank's GPU over the student's architecture (weights: the next sync)."""
        from .vllm_rollout import VllmGenerator, export_config

        cfg = self.cfg
        keep, model = None, cfg.model.student
        if model == BUILTIN:  # in memory only: vLLM reads its config and tokenizer from a folder
            keep = export_config(lm, tok)
            model = keep.name
        # bf16 whatever model.dtype says: on CUDA the student's forwards run under bf16 autocast (or in bf16
        # weights), so that is the distribution it trains on; vLLM's attention kernels want 16-bit weights too.
        return VllmGenerator.create(model=model, dtype="bfloat16",
                                    gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                                    max_model_len=cfg.rollout.max_episode_tokens,
                                    seed=(cfg.seed + self.dist.rank) % (1 << 31),
                                    trust_remote_code=cfg.model.trust_remote_code, keep_alive=keep)

    def sync_vllm(self) -> list[str]:
        """The student LM's parameters (not the value head) into the vLLM engine: at setup and after every update."""
        lm = self.models.policy.lm
        return self.vllm.sync_weights(lm.named_parameters(),
                                      gathered=self.engine.gathered if self.engine.zero3 else None)

    @staticmethod
    def _load_weights(policy: Policy, ckpt: Path) -> None:
        from safetensors.torch import load_file

        from .models import load_value_head

        state = {}
        for f in sorted((ckpt / "student").glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = policy.lm.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _tied_keys(policy.lm)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {ckpt} does not match the student: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        load_value_head(policy.value_head, ckpt / "value_head.safetensors")

    # ----------------------------------------------------------------- one step
    def rollout(self, step: int) -> list[Trajectory]:
        cfg = self.cfg
        d = self.dist
        # Rank r plays episodes r, r + world, ... of the step, sampling from its own generator.
        n, g = cfg.rollout.episodes_per_step, cfg.group_size
        ids = list(range(n))[d.rank::d.world]
        seeds = group_env_seeds(cfg.seed, step, n, g)[d.rank::d.world]
        envs = [cfg.env.make() for _ in seeds]
        torch.manual_seed((step_seed(cfg.seed, step) + 1_000_003 * d.rank) % (1 << 62))
        generate = None
        if self.vllm is not None:  # each request seeded from (step, episode seed, turn): ranks differ by episode
            generate = functools.partial(self.vllm.generate, base_seed=step_seed(cfg.seed, step, salt=2))
        return play(self.models.policy.lm, self.models.tokenizer, self.fmt, envs, seeds, max_turns=self.max_turns,
                    max_new_tokens=cfg.rollout.max_new_tokens, max_episode_tokens=cfg.rollout.max_episode_tokens,
                    temperature=cfg.rollout.temperature, device=self.device,
                    any_rank_active=d.any if self.engine.zero3 and generate is None else None, generate=generate,
                    sample_keys=sample_keys(seeds, ids, g))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _layout(self, trajs: list[Trajectory]) -> tuple[Packed, torch.Tensor]:
        """The trajectories packed end to end, and the packed positions whose hidden state predicts an agent token.

        Row i of the hidden states predicts token i + 1 of the same trajectory; the last token of a
        trajectory predicts nothing.
        """
        packed = pack([torch.tensor(t.tokens, dtype=torch.long) for t in trajs])
        packed = Packed(packed.input_ids.to(self.device), packed.position_ids.to(self.device), packed.cu_seqlens,
                        packed.lengths)
        act = torch.tensor([a for t in trajs for a in t.action_mask], dtype=torch.bool)
        nxt = torch.zeros_like(act)
        nxt[:-1] = act[1:]
        nxt[packed.cu_seqlens[1:] - 1] = False
        return packed, nxt.nonzero().squeeze(1).to(self.device)

    def _hidden(self, lm, packed: Packed) -> torch.Tensor:
        with self._autocast():
            return last_hidden_states(decoder_of(lm), packed, mode=self.cfg.model.packing)

    def _logprobs(self, hidden: torch.Tensor, lm, targets: torch.Tensor) -> torch.Tensor:
        w, bias = lm_head(lm)
        n = self.vocab_size or w.shape[0]
        logits = (hidden.float() @ w[:n].float().T) / self.cfg.loss.temperature
        if bias is not None:
            logits = logits + bias[:n].float() / self.cfg.loss.temperature
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)

    @torch.no_grad()
    def prepare(self, step: int, trajs: list[Trajectory]) -> dict:
        """Everything the PPO epochs need, as per-agent-token tensors in trajectory order."""
        cfg, m = self.cfg, self.models
        packed, arow = self._layout(trajs)
        targets = packed.input_ids[arow + 1]
        h = self._hidden(m.policy.lm, packed)  # [T, H]
        values_tok = m.policy.value_head(h)  # [T]
        with self.engine.gathered(lm_head(m.policy.lm)):
            old_logprobs = self._logprobs(h[arow], m.policy.lm, targets)
        out = {"targets": targets, "old_logprobs": old_logprobs, "old_values": values_tok[arow]}
        if m.teacher is not None and self.lam_ctl.lambda_max > 0:
            out["teacher_hidden"] = self._hidden(m.teacher, packed)[arow]
        if m.reference is not None:
            out["ref_logprobs"] = self._logprobs(self._hidden(m.reference, packed)[arow], m.reference, targets)
        out["counts"] = [sum(t.action_mask[1:]) for t in trajs]
        if cfg.ppo.advantage == "grpo":
            d = self.dist
            adv = GrpoEstimator(cfg.group_size).token_advantages(
                torch.tensor([t.reward for t in trajs]), list(range(cfg.rollout.episodes_per_step))[d.rank::d.world],
                cfg.rollout.episodes_per_step, out["counts"],
                all_reduce=(lambda x: d.all_reduce(x.to(d.comm_device))) if d.world > 1 else None)
            out["advantages"], out["returns"] = adv.to(self.device), torch.zeros_like(adv, device=self.device)
        else:
            out["advantages"], out["returns"] = self._gae(trajs, packed, values_tok)
        turn = torch.tensor([k for t in trajs for k in t.turn_idx], dtype=torch.long, device=self.device)
        out["lam"] = self.lam_ctl.lam(step, turn[arow + 1])
        out["trajs"] = trajs
        return out

    def _gae(self, trajs, packed, values_tok):
        cfg = self.cfg
        # GAE runs over the rows 0 .. len-2 of every trajectory (each predicts the next token); a
        # turn's reward sits on the row that predicts the turn's last agent token.
        cu_tok = packed.cu_seqlens
        rows = torch.ones(int(cu_tok[-1]), dtype=torch.bool)
        rows[cu_tok[1:] - 1] = False
        row_pos = rows.nonzero().squeeze(1)
        act = torch.tensor([a for t in trajs for a in t.action_mask], dtype=torch.bool)
        rewards_tok = torch.zeros(int(cu_tok[-1]))
        for b, t in enumerate(trajs):
            for pos, r in zip(t.turn_last_token, t.turn_rewards, strict=True):
                rewards_tok[int(cu_tok[b]) + pos - 1] += r
        boot = torch.tensor([float(values_tok[int(cu_tok[b + 1]) - 1]) if t.truncated else 0.0
                             for b, t in enumerate(trajs)])
        cu_rows = cu_tok - torch.arange(len(trajs) + 1)
        act_rows = act[row_pos + 1]
        adv, ret = compute_gae(rewards_tok[row_pos], values_tok.float().cpu()[row_pos], cu_rows, act_rows,
                               gamma=cfg.ppo.gamma, lam=cfg.ppo.gae_lambda, bootstrap_values=boot)
        adv, ret = adv[act_rows].to(self.device), ret[act_rows].to(self.device)
        if cfg.ppo.whiten_advantages and self.dist.world > 1:
            adv = whiten_global(adv, self.dist).to(self.device)  # statistics of the global batch
        elif cfg.ppo.whiten_advantages and adv.numel() > 1:
            adv = masked_whiten(adv, torch.ones_like(adv, dtype=torch.bool))
        return adv, ret

    def update(self, step: int, data: dict) -> dict:
        """PPO epochs × minibatches. A minibatch is a set of the step's episodes over all ranks; each rank
        computes the loss of its own episodes in it, weighted so that the gradient the engine averages over
        ranks is the gradient of the minibatch's global token mean (the 1-process loss)."""
        cfg, m, d = self.cfg, self.models, self.dist
        trajs, counts = data["trajs"], data["counts"]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        per_traj = [k for k in ("targets", "old_logprobs", "old_values", "teacher_hidden", "ref_logprobs",
                                "advantages", "returns", "lam") if k in data]
        n_global = cfg.rollout.episodes_per_step
        g_counts = torch.zeros(n_global, dtype=torch.float64)
        g_counts[d.rank::d.world] = torch.tensor(counts, dtype=torch.float64)
        g_counts = d.all_reduce(g_counts.to(d.comm_device)).cpu().long().tolist()
        spare = max(range(len(counts)), key=lambda i: counts[i])  # a rank with nothing in a minibatch runs this
        if d.world > 1 and any(g_counts) and not counts[spare]:
            raise RuntimeError(f"rank {d.rank}: none of its episodes has an agent token; raise "
                               "rollout.max_episode_tokens")
        teacher_head = lm_head(m.teacher) if "teacher_hidden" in data else (None, None)
        value_only = self.lam_ctl.value_only(step)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=1))
        sums: dict[str, float] = {}
        n_rows, skipped, grad_norms = 0, 0, []
        for _ in range(cfg.ppo.epochs):
            order = torch.randperm(n_global, generator=gen)
            for mb in order.chunk(cfg.ppo.minibatches):
                mb = mb.tolist()
                global_n = sum(g_counts[i] for i in mb)
                if global_n == 0:
                    continue
                idx = [i // d.world for i in mb if i % d.world == d.rank and g_counts[i] > 0]
                weight = d.world * sum(counts[i] for i in idx) / global_n
                if not idx:
                    idx = [spare]
                sel = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx]).to(self.device)
                batch = {k: data[k][sel] for k in per_traj}
                packed, arow = self._layout([trajs[i] for i in idx])
                with self.engine.gathered(teacher_head if cfg.distributed.teacher_zero3 else ()):
                    res = self.engine(packed, arow, packing=cfg.model.packing, autocast=self.device.type == "cuda",
                                      loss_fn=self._loss_fn(batch, teacher_head, value_only))
                    total = res["total"]
                    if d.any(not bool(torch.isfinite(total))):
                        skipped += 1
                        continue
                    self.engine.backward(total * weight)
                if value_only:  # the value head's warm-up: AdamW skips parameters without a gradient
                    for p in m.policy.lm.parameters():
                        p.grad = None
                gn = self.engine.step()
                if gn is None:
                    skipped += 1
                    continue
                grad_norms.append(gn)
                if weight == 0:
                    continue
                k = len(sel)
                n_rows += k
                out = res["out"]
                for name, val in (("loss", total.item() * k), ("value_loss", res["value_loss"].item() * k),
                                  ("distill", out.distill.sum().item()), ("pg", out.pg.sum().item()),
                                  ("kl", out.kl.sum().item()), ("entropy", out.entropy.sum().item()),
                                  ("clipfrac", out.clipped.float().sum().item())):
                    sums[name] = sums.get(name, 0.0) + val
        names = ("loss", "value_loss", "distill", "pg", "kl", "entropy", "clipfrac")
        reduced = d.sum_floats([sums.get(k, 0.0) for k in names] + [float(n_rows)])
        n_rows = reduced[-1]
        metrics = {k: (v / n_rows if n_rows else float("nan")) for k, v in zip(names, reduced, strict=False)}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        metrics["skipped_updates"] = skipped
        metrics["nonfinite"] = skipped > 0
        return metrics

    def _loss_fn(self, d: dict, teacher_head, value_only: bool = False):
        """The minibatch's loss from the student's hidden states (called inside the engine's forward)."""
        cfg = self.cfg
        w_t, b_t = teacher_head

        def loss_fn(h, v, w_s, b_s):
            out = atod_loss(
                h, w_s, d["targets"], d["old_logprobs"], d["advantages"], d["lam"],
                torch.ones_like(d["lam"], dtype=torch.bool), student_bias=b_s,
                teacher_hidden=d.get("teacher_hidden"), teacher_weight=w_t, teacher_bias=b_t,
                ref_logprobs=d.get("ref_logprobs"), divergence=cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta,
                temperature=cfg.loss.temperature, clip_eps_low=cfg.loss.clip_eps_low,
                clip_eps_high=cfg.loss.clip_eps_high, dual_clip=cfg.loss.dual_clip, kl_coef=cfg.loss.kl_coef,
                entropy_coef=cfg.loss.entropy_coef, vocab_size=self.vocab_size, backend=cfg.loss.backend,
            )
            v_loss = (v - d["returns"]) ** 2
            if cfg.ppo.value_clip is not None:
                v_clip = d["old_values"] + (v - d["old_values"]).clamp(-cfg.ppo.value_clip, cfg.ppo.value_clip)
                v_loss = torch.maximum(v_loss, (v_clip - d["returns"]) ** 2)
            v_loss = 0.5 * v_loss.mean()
            if cfg.ppo.advantage == "grpo":  # no critic: the value head stays in the graph (DDP) with no gradient
                return {"total": out.loss + 0.0 * v.sum(), "value_loss": torch.zeros(()), "out": out}
            if value_only:  # the value head's warm-up after the hand-over
                return {"total": cfg.ppo.value_loss_coef * v_loss + 0.0 * out.loss, "value_loss": v_loss, "out": out}
            return {"total": out.loss + cfg.ppo.value_loss_coef * v_loss, "value_loss": v_loss, "out": out}

        return loss_fn

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        trajs = self.rollout(step)
        t1 = time.perf_counter()
        data = self.prepare(step, trajs)
        metrics = self.update(step, data)
        if self.vllm is not None:  # the next rollout samples from the updated student
            self.sync_vllm()
        t2 = time.perf_counter()
        # Every rank's share, added up: the logged numbers are those of the global batch.
        lam = data["lam"]
        reduced = self.dist.sum_floats([*rollout_sums(trajs), float(lam.sum()), float(lam.numel()),
                                        float(sum(data["counts"]))])
        stats = stats_from_sums(reduced[:-3])
        lam_sum, lam_n, action_tokens = reduced[-3:]
        n_tokens = int(stats["episode_tokens_mean"] * reduced[0])
        horizon = self.lam_ctl.turn_horizon
        lam_turn = self.lam_ctl.lam(step, torch.arange(max(horizon, self.max_turns))).tolist()
        out = {
            "step": step, **metrics,
            "lambda_mean": lam_sum / lam_n if lam_n else float("nan"),
            "lambda_turn": [round(x, 6) for x in lam_turn],
            **stats, "tokens": n_tokens, "action_tokens": int(action_tokens),
            "tokens_per_s": n_tokens / max(t2 - t0, 1e-9), "rollout_s": t1 - t0, "update_s": t2 - t1,
        }
        self.lam_ctl.observe(step, out)  # may open the hand-over gate: before the LR of the next step is set
        out.update(self.lam_ctl.metrics())
        with warnings.catch_warnings():  # the LR schedule follows training steps, even fully skipped ones
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    # ----------------------------------------------------------------- the loop
    def save(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, policy=self.models.policy, tokenizer=self.models.tokenizer,
                               engine=self.engine, dist=self.dist, scheduler=self.scheduler,
                               config_yaml=to_yaml(self.cfg), state={"nonfinite_streak": self.nonfinite_streak,
                                                                  "lam": self.lam_ctl.state_dict()},
                               max_steps=self.cfg.max_steps, keep_last=self.cfg.checkpoint.keep_last)

    def train(self) -> dict:
        """Run to max_steps; returns the final evaluation table (empty if eval.at_end is false)."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.dist.is_main
        if main:  # every rank computes the metrics; rank 0 alone writes files and shows progress
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if self.resume_from is not None:
            meta = read_meta(self.resume_from)
            if meta["step"] >= cfg.max_steps:
                if main:
                    print(f"run already finished: {self.resume_from} is at step {meta['step']} of "
                          f"{cfg.max_steps}; nothing to do")
                return {}
        self.setup(progress=cfg.logging.progress)
        if cfg.eval.every and self.engine.zero3:
            # Held-out evaluation runs on rank 0 alone, which cannot see parameters ZeRO-3 shards.
            raise ConfigError("eval.every: held-out evaluation during training needs unsharded parameters; "
                              "expected 0 with distributed.zero_stage=3")
        if self.start_step and main:
            log.info("resuming from %s (step %d)", self.resume_from, self.start_step)
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard,
                               resume_step=self.start_step) if main else None
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc="train",
                   disable=not (cfg.logging.progress and main), dynamic_ncols=True)
        last_good = latest_checkpoint(self.run_dir)
        try:
            for step in range(self.start_step + 1, cfg.max_steps + 1):
                m = self.step(step)
                if main and cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.max_steps):
                    m.update(self.heldout(step))
                if writer is not None:
                    writer.write(m)
                self.nonfinite_streak = self.nonfinite_streak + 1 if m["nonfinite"] else 0
                if m["nonfinite"] and main:
                    log.warning("step %d: non-finite loss in %d minibatch(es); those updates were skipped",
                                step, m["skipped_updates"])
                if self.nonfinite_streak >= cfg.optim.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"stopping at step {step}: non-finite loss in {self.nonfinite_streak} consecutive steps "
                        f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); last good checkpoint: "
                        f"{last_good or 'none'}. Lower optim.lr or check the reward and model outputs")
                bar.update(1)
                bar.set_postfix_str(f"tok/s={m['tokens_per_s']:.0f} reward={m['reward_mean']:.2f} "
                                    f"success={m['success_rate']:.2f} λ={m['lambda_mean']:.2f}")
                if main and not cfg.logging.progress and (step % cfg.logging.log_every == 0
                                                          or step == cfg.max_steps):
                    print(f"step {step}/{cfg.max_steps} loss={m['loss']:.4f} reward={m['reward_mean']:.3f} "
                          f"success={m['success_rate']:.3f} λ={m['lambda_mean']:.3f} tok/s={m['tokens_per_s']:.0f}",
                          flush=True)
                if step % cfg.checkpoint.every == 0 or step == cfg.max_steps:
                    last_good = self.save(step)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if not cfg.eval.at_end:
            return {}
        rows = self.final_eval(last_good) if main else {}
        self.dist.barrier()
        return rows

    def heldout(self, step: int) -> dict:
        """Held-out success of the current student (eval.every), on rank 0; leaves every training RNG untouched."""
        t0 = time.perf_counter()
        r = evaluate_model(self.models.policy.lm, self.models.tokenizer,
                           **eval_kwargs(self.cfg, self.device, self.cfg.eval.episodes))
        return {"heldout_success_rate": r["success_rate"], "heldout_reward_mean": r["reward_mean"],
                "heldout_s": time.perf_counter() - t0}

    def final_eval(self, ckpt: Path | None = None) -> dict:
        """On rank 0 alone: parameters sharded by ZeRO-3 are read back from the checkpoint's HF export."""
        cfg = self.cfg
        student, teacher = self.models.policy.lm, self.models.teacher
        if self.engine.zero3:
            student = load_causal_lm(str(ckpt / "student"), dtype=cfg.model.dtype)[0].to(self.device)
        if cfg.distributed.teacher_zero3:
            teacher = None  # sharded over the ranks: not evaluated by one
        rows = compare(cfg, student, self.models.tokenizer, teacher, self.teacher_path, self.device,
                       episodes=cfg.eval.episodes)
        import json

        (self.run_dir / "eval.json").write_text(json.dumps(rows, indent=2))
        print(f"\nHeld-out evaluation ({cfg.eval.episodes} episodes of {cfg.env.name}, "
              f"temperature {cfg.eval.temperature}):\n")
        print(format_table(rows))
        return rows


def _tied_keys(lm) -> set[str]:
    keys = getattr(lm, "_tied_weights_keys", None) or []
    return set(keys.keys()) if isinstance(keys, dict) else set(keys)


def eval_kwargs(cfg: TrainConfig, device: torch.device, episodes: int) -> dict:
    r = cfg.rollout
    return dict(env_name=cfg.env.name, env_kwargs=cfg.env.resolved_kwargs(), episodes=episodes,
                max_turns=r.max_turns, max_new_tokens=r.max_new_tokens, max_episode_tokens=r.max_episode_tokens,
                temperature=cfg.eval.temperature, device=device, chat_template=cfg.model.chat_template)


def compare(cfg: TrainConfig, student_lm, tokenizer, teacher, teacher_path, device, *, episodes: int,
            student_name: str = "student-after") -> dict:
    """Held-out success of teacher, the initial student and ``student_lm``."""
    kw = eval_kwargs(cfg, device, episodes)
    rows = {}
    if teacher is not None:
        rows["teacher"] = evaluate_model(teacher, tokenizer, **kw)
    before, _ = initial_student(cfg, teacher_path)
    rows["student-before"] = evaluate_model(before.to(device), tokenizer, **kw)
    del before
    rows[student_name] = evaluate_model(student_lm, tokenizer, **kw)
    return rows
