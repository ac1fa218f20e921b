"""The ATOD trainer: the loop that wires the step's parts.

One training step (``Trainer.step``), each part in its own module:

1. rollout: this rank's episodes, played by the student (``engines``: ``hf`` or ``vllm``);
2. the step batch: the episodes packed end to end, their agent rows (``batch``);
3. the student's behaviour statistics: old log-probs and values (``learner.PpoLearner.behaviour``);
4. teacher scoring on agent rows (``teacher``) and, with ``kl_coef > 0``, reference log-probs (``reference``);
5. advantages and value targets (``advantages``: GAE with the value head, or ``grpo``: group-normalized returns);
6. λ per agent token (``lam``: the λ controller; ``handover``: the progress-gated hand-over of ``mode=atod``);
7. ``ppo.epochs`` × ``ppo.minibatches`` steps on ``atod_loss`` + a clipped value loss (``learner``);
8. the rollout engine takes the new weights; metrics, checkpoints (``checkpoint``), evaluation (``evaluation``).

Reproducibility: the environment seeds, the sampling generator and the minibatch order of a
step are all derived from (seed, step), and checkpoints carry the optimizer, the scheduler and
the λ controller's state, so a resumed run takes exactly the steps an uninterrupted run takes (on CPU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .advantages import make_estimator
from .allocator import keep_freed_blocks
from .batch import StepBatch
from .checkpoint import latest_checkpoint, read_meta, save_checkpoint
from .config import ConfigError, TrainConfig, to_yaml
from .distributed import Dist, make_engine
from .engines import make_rollout_engine
from .evaluation import final_evaluation, heldout_metrics
from .handover import after_observe, lr_factor, make_controller, value_only
from .learner import NonFiniteGuard, NonFiniteLossError, PpoLearner, make_optimizer
from .loading import (
    find_resume,
    load_models,
    loss_vocab_size,
    restore_training_state,
    teacher_location,
)
from .metrics import MetricsWriter
from .models import load_causal_lm
from .reference import ReferenceScorer
from .rollout import Trajectory, rollout_sums, stats_from_sums
from .teacher import make_teacher, score_rows
from .threads import set_cpu_threads

log = logging.getLogger("atod_fast")

__all__ = ["PARTS", "NonFiniteLossError", "Trainer"]

PARTS = ("controller", "teacher", "reference", "advantages")
"""The parts a ``Trainer(parts=...)`` may replace: a :class:`~.lam.LambdaController`, a :class:`~.teacher.TeacherScorer`
(or None), the KL reference scorer (or None) and an :class:`~.advantages.AdvantageEstimator`. The defaults are
built first (the local teacher only when the configured schedule's λ_max > 0), so a factory may read them."""


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; ``train()`` runs it."""

    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, parts: dict | None = None):
        """``parts``: part name (one of :data:`PARTS`) → ``factory(trainer)``, called in ``setup`` once the default
        parts are built, before a checkpoint's state is restored into them; its result replaces that part."""
        self.cfg, self.run_dir, self.parts = cfg, Path(cfg.output_dir), dict(parts or {})
        if unknown := sorted(set(self.parts) - set(PARTS)):
            raise ValueError(f"parts: expected names among {list(PARTS)}, got {unknown}")
        self.dist = Dist(cfg.distributed)
        self.device = self.dist.device(cfg.device)
        _check_run(cfg, self.dist.world, self.device)
        self.dist.init(self.device)
        self.resume_from = find_resume(self.run_dir, resume, cfg, self.dist.world)
        self.start_step, self.guard = 0, NonFiniteGuard(cfg.optim.max_nonfinite_steps)

    def setup(self, *, progress: bool = True) -> None:
        cfg, dev = self.cfg, self.device
        keep_freed_blocks(dev)  # before the teacher build, which trains too
        with self.dist.main_first():  # one rank builds the built-in teacher, the others read the cache
            self.teacher_path = teacher_location(cfg, progress=progress and self.dist.is_main)
        set_cpu_threads(cfg)  # after the teacher build, which sets its own
        m = self.models = load_models(cfg, self.teacher_path, device=dev, world=self.dist.world,
                                      resume_from=self.resume_from)
        self.max_turns = cfg.rollout.max_turns or cfg.env.make().max_turns
        self.controller = make_controller(cfg, m, max_turns=self.max_turns, teacher_path=self.teacher_path,
                                          dist=self.dist, device=dev)
        optimizer, self.scheduler = make_optimizer(cfg, m.policy, lr_factor=lambda s: lr_factor(self.controller, s))
        self.engine = make_engine(cfg.distributed, m.policy, optimizer, max_grad_norm=cfg.optim.max_grad_norm,
                                  device=dev, world=self.dist.world)
        vocab = loss_vocab_size(m)
        self.learner = PpoLearner(cfg, m.policy, self.engine, self.scheduler, self.dist, vocab_size=vocab,
                                  n_turns=self.max_turns)
        self.teacher = make_teacher(cfg, m, lambda_max=self.controller.lambda_max,
                                    gather=self.engine.gathered if cfg.distributed.teacher_zero3 else None,
                                    vocab_size=vocab)
        self.reference = None if m.reference is None else ReferenceScorer(
            m.reference, packing=cfg.model.packing, temperature=cfg.loss.temperature, vocab_size=vocab,
            backend=cfg.loss.backend)
        self.advantages = make_estimator(cfg, self.dist)
        for name, make in self.parts.items():
            setattr(self, name, make(self))
        if self.resume_from is not None:  # before the vLLM engine: its first sync sends the restored weights
            st = restore_training_state(self.resume_from, engine=self.engine, scheduler=self.scheduler,
                                        rank=self.dist.rank)
            self.start_step, self.guard.streak = st["step"], st.get("nonfinite_streak", 0)
            self.controller.load_state_dict(st.get("lambda_controller", {}))
        self.rollout_engine = make_rollout_engine(cfg, m.policy.lm, m.tokenizer, max_turns=self.max_turns,
                                                  dist=self.dist, engine=self.engine, device=dev)

    # ----------------------------------------------------------------- one step
    def rollout(self, step: int) -> list[Trajectory]:
        return self.rollout_engine.rollout(step)

    @torch.no_grad()
    def prepare(self, step: int, trajs: list[Trajectory]) -> tuple[StepBatch, dict[str, torch.Tensor] | None]:
        """The step batch and everything the PPO epochs need per agent row, in trajectory order (None: the teacher
        server failed, the step is skipped)."""
        batch = StepBatch.build(trajs, self.device)
        rows, values = self.learner.behaviour(batch)
        if (scores := score_rows(batch, (self.teacher, self.reference), self.dist, step)) is None:
            return batch, None
        rows.update(scores)
        rows["advantages"], ret = self.advantages(batch, values if self.advantages.needs_values else None)
        if ret is not None:
            rows["returns"] = ret
        rows["lam"] = self.controller.lam(step, batch.agent_turns)
        return batch, rows

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        trajs = self.rollout(step)
        t1 = time.perf_counter()
        batch, rows = self.prepare(step, trajs)
        if rows is None:  # no teacher scores: no update
            rows, metrics = {"lam": self.controller.lam(step, batch.agent_turns)}, self.learner.skip()
        else:
            metrics = self.learner.update(step, batch, rows, self.teacher, value_only=value_only(self.controller, step))
        self.rollout_engine.sync()  # the next rollout samples from the updated student
        t2 = time.perf_counter()
        lam_turn = [round(x, 6) for x in self.controller.lambda_turn(step, self.max_turns)]
        stats = _global_stats(self.dist, trajs, rows["lam"], batch.counts)
        out = {"step": step, **metrics, "lambda_mean": stats.pop("lambda_mean"), "lambda_turn": lam_turn, **stats,
               "tokens_per_s": stats["tokens"] / max(t2 - t0, 1e-9), "rollout_s": t1 - t0, "update_s": t2 - t1}
        self.controller.observe(step, out)  # training episodes only; the hand-over gate may open here
        return {**out, **after_observe(self.controller, self.learner)}  # its metrics, the next step's LR

    # ----------------------------------------------------------------- the loop
    def save(self, step: int) -> Path:
        state = {"nonfinite_streak": self.guard.streak, "lambda_controller": self.controller.state_dict()}
        return save_checkpoint(self.run_dir, step, policy=self.models.policy, tokenizer=self.models.tokenizer,
                               engine=self.engine, dist=self.dist, scheduler=self.scheduler,
                               config_yaml=to_yaml(self.cfg), state=state,
                               max_steps=self.cfg.max_steps, keep_last=self.cfg.checkpoint.keep_last)

    def _start(self) -> bool:
        """Writes the run's config and sets up; False when the resumed run is already finished."""
        cfg, main = self.cfg, self.dist.is_main
        if main:  # every rank computes the metrics; rank 0 alone writes files and shows progress
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if self.resume_from is not None and (done := read_meta(self.resume_from)["step"]) >= cfg.max_steps:
            if main:
                print(f"run already finished: {self.resume_from} is at step {done} of {cfg.max_steps}; nothing to do")
            return False
        self.setup(progress=cfg.logging.progress)
        if self.start_step and main:
            log.info("resuming from %s (step %d)", self.resume_from, self.start_step)
        return True

    def train(self) -> dict:
        """Run to max_steps; returns the final evaluation table (empty if eval.at_end is false)."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.dist.is_main
        if not self._start():
            return {}
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard, resume_step=self.start_step,
                               wandb=cfg.logging, run_config=cfg) if main else None
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc="train",
                   disable=not (cfg.logging.progress and main), dynamic_ncols=True)
        last_good = latest_checkpoint(self.run_dir)
        try:
            for step in range(self.start_step + 1, cfg.max_steps + 1):
                m = self.step(step)
                if main and cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.max_steps):
                    m.update(heldout_metrics(cfg, self.models.policy.lm, self.models.tokenizer, self.device))
                if writer is not None:
                    writer.write(m)
                self.guard.check(step, m, last_good=last_good, warn=main)
                _progress(cfg, step, m, bar, main)
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

    def final_eval(self, ckpt: Path | None = None) -> dict:
        """On rank 0 alone: parameters sharded by ZeRO-3 are read back from the checkpoint's HF export."""
        cfg, m = self.cfg, self.models
        student = load_causal_lm(str(ckpt / "student"), dtype=cfg.model.dtype)[0].to(self.device) \
            if self.engine.zero3 else m.policy.lm
        teacher = None if cfg.distributed.teacher_zero3 else m.teacher  # sharded over the ranks: not evaluated
        return final_evaluation(cfg, self.run_dir, student, m.tokenizer, teacher, self.teacher_path, self.device)


def _check_run(cfg: TrainConfig, world: int, device: torch.device) -> None:
    """Mistakes that only show with the launch (world size, device): caught before anything is built."""
    if cfg.rollout.episodes_per_step < world:
        raise ConfigError(f"rollout.episodes_per_step: expected at least one episode per rank (>= {world}), got "
                          f"{cfg.rollout.episodes_per_step}")
    if cfg.rollout.engine == "vllm":
        from .vllm_rollout import check_available

        check_available(device)
    if cfg.model.lora.r and cfg.distributed.engine == "deepspeed" and cfg.distributed.zero_stage == 3:
        raise ConfigError("model.lora.r: LoRA students are not supported with distributed.zero_stage=3 (the "
                          "checkpoint's adapter export and evaluation expect unsharded weights); use ZeRO-2 or DDP")
    if cfg.eval.every and cfg.distributed.engine == "deepspeed" and cfg.distributed.zero_stage == 3:
        # Held-out evaluation runs on rank 0 alone, which cannot see parameters ZeRO-3 shards.
        raise ConfigError("eval.every: held-out evaluation during training needs unsharded parameters; "
                          "expected 0 with distributed.zero_stage=3")


def _global_stats(dist: Dist, trajs: list[Trajectory], lam: torch.Tensor, counts: list[int]) -> dict:
    """Rollout statistics and λ's mean over every rank's share, added up: those of the global batch."""
    reduced = dist.sum_floats([*rollout_sums(trajs), float(lam.sum()), float(lam.numel()), float(sum(counts))])
    stats = stats_from_sums(reduced[:-3])
    lam_sum, lam_n, action_tokens = reduced[-3:]
    return {"lambda_mean": lam_sum / lam_n if lam_n else float("nan"), **stats,
            "tokens": int(stats["episode_tokens_mean"] * reduced[0]), "action_tokens": int(action_tokens)}


def _progress(cfg: TrainConfig, step: int, m: dict, bar, main: bool) -> None:
    bar.update(1)
    bar.set_postfix_str(f"tok/s={m['tokens_per_s']:.0f} reward={m['reward_mean']:.2f} "
                        f"success={m['success_rate']:.2f} λ={m['lambda_mean']:.2f}")
    if main and not cfg.logging.progress and (step % cfg.logging.log_every == 0 or step == cfg.max_steps):
        print(f"step {step}/{cfg.max_steps} loss={m['loss']:.4f} reward={m['reward_mean']:.3f} "
              f"success={m['success_rate']:.3f} λ={m['lambda_mean']:.3f} tok/s={m['tokens_per_s']:.0f}", flush=True)
