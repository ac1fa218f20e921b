"""The learner: the student's optimizer and the PPO epochs × minibatches over the fused ATOD loss.

:class:`PpoLearner` owns the student (through the data-parallel engine), its AdamW optimizer
and LR schedule. Per step it first gives the behaviour statistics of the step batch
(``behaviour``: old log-probs, old values, the values on every token), then runs ``update``:
``ppo.epochs`` × ``ppo.minibatches`` steps on ``atod_loss`` plus a clipped value loss.

A minibatch is a set of the step's episodes over all ranks; each rank computes the loss of its
own episodes in it, weighted so that the gradient the engine averages over ranks is the
gradient of the minibatch's global token mean (the 1-process loss).

The per-row inputs come as one dict (first dimension A, the step's agent rows): the learner's
own keys (:data:`OWN_KEYS`), and any others (the teacher scorer's, ``ref_logprobs``) go to
``atod_loss`` by name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import torch

from ..ops.losses import atod_loss
from .batch import StepBatch
from .config import TrainConfig
from .distributed import Dist
from .models import lm_head
from .reference import token_logprobs
from .seeds import step_seed

log = logging.getLogger("atod_fast")

OWN_KEYS = ("targets", "old_logprobs", "old_values", "advantages", "returns", "lam")
METRICS = ("loss", "value_loss", "distill", "pg", "kl", "entropy", "clipfrac", "teacher_entropy")


def lr_lambda(cfg: TrainConfig):
    """The LR multiplier of optimizer step k: linear warm-up, then constant, linear or cosine decay."""
    o, total = cfg.optim, cfg.max_steps

    def f(k: int) -> float:
        if k < o.warmup_steps:
            return (k + 1) / o.warmup_steps
        if o.lr_schedule == "constant":
            return 1.0
        p = min((k - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
        decay = 1.0 - p if o.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay

    return f


def make_optimizer(cfg: TrainConfig, policy, lr_factor=None) -> tuple[torch.optim.Optimizer,
                                                                      torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its LR schedule; ``lr_factor(step)`` (1-based training step) multiplies the schedule (the
    hand-over's ``optim.handover_lr_scale``), read whenever the LR is set."""
    o = cfg.optim
    trainable = [p for p in policy.parameters() if p.requires_grad]  # a LoRA student: adapters and value head
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    f = lr_lambda(cfg)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f if lr_factor is None else lambda k: f(k) * lr_factor(k + 1))


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class NonFiniteGuard:
    """Counts consecutive steps whose updates were skipped for a non-finite loss; stops the run at ``limit``
    (``optim.max_nonfinite_steps``). ``streak`` goes into checkpoints."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0

    def check(self, step: int, metrics: dict, *, last_good, warn: bool) -> None:
        self.streak = self.streak + 1 if metrics["nonfinite"] else 0
        if metrics["nonfinite"] and warn:
            log.warning("step %d: non-finite loss in %d minibatch(es); those updates were skipped",
                        step, metrics["skipped_updates"])
        if self.streak >= self.limit:
            raise NonFiniteLossError(
                f"stopping at step {step}: non-finite loss in {self.streak} consecutive steps "
                f"(optim.max_nonfinite_steps={self.limit}); last good checkpoint: "
                f"{last_good or 'none'}. Lower optim.lr or check the reward and model outputs")


class _Tally:
    """Row-weighted sums of the minibatches' metrics, reduced over ranks at the end of the step."""

    def __init__(self, n_turns: int = 1):
        self.sums: dict[str, float] = {}
        self.rows, self.skipped, self.grad_norms = 0, 0, []
        # Per turn index: Σ distill, Σ teacher entropy, rows (the adaptive turn weights' statistics).
        self.turns = torch.zeros(3, n_turns, dtype=torch.float64)

    def add(self, res: dict, k: int, turns: torch.Tensor) -> None:
        self.rows += k
        out, total = res["out"], res["total"]
        for name, val in (("loss", total.item() * k), ("value_loss", res["value_loss"].item() * k),
                          ("distill", out.distill.sum().item()), ("pg", out.pg.sum().item()),
                          ("kl", out.kl.sum().item()), ("entropy", out.entropy.sum().item()),
                          ("clipfrac", out.clipped.float().sum().item()),
                          ("teacher_entropy", out.teacher_entropy.sum().item())):
            self.sums[name] = self.sums.get(name, 0.0) + val
        idx = turns.cpu().long().clamp(0, self.turns.shape[1] - 1)
        for r, per_row in enumerate((out.distill, out.teacher_entropy, torch.ones_like(out.distill))):
            self.turns[r].index_add_(0, idx, per_row.detach().cpu().double())

    def metrics(self, d: Dist) -> dict:
        n_turns = self.turns.shape[1]
        reduced = d.sum_floats([self.sums.get(k, 0.0) for k in METRICS] + self.turns.flatten().tolist()
                               + [float(self.rows)])
        n_rows = reduced[-1]
        m = {k: (v / n_rows if n_rows else float("nan")) for k, v in zip(METRICS, reduced, strict=False)}
        t = torch.tensor(reduced[len(METRICS):-1], dtype=torch.float64).view(3, n_turns)
        m["turn_distill"] = [float(s / c) if c else None for s, c in zip(t[0], t[2], strict=True)]
        m["turn_teacher_entropy"] = [float(s / c) if c else None for s, c in zip(t[1], t[2], strict=True)]
        m["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else float("nan")
        m["skipped_updates"] = self.skipped
        m["nonfinite"] = self.skipped > 0
        m["teacher_skipped"] = False
        return m


class PpoLearner:
    """PPO over the fused loss for the student (``policy``: LM + value head) inside the data-parallel ``engine``;
    ``scheduler`` steps once per training step."""

    def __init__(self, cfg: TrainConfig, policy, engine, scheduler, dist: Dist, *, vocab_size: int | None,
                 n_turns: int = 1):
        self.cfg, self.policy, self.engine, self.scheduler, self.dist = cfg, policy, engine, scheduler, dist
        self.vocab_size, self.n_turns = vocab_size, n_turns

    @torch.no_grad()
    def behaviour(self, batch: StepBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The student before the update: per agent row ``targets``, ``old_logprobs``, ``old_values``; and the
        values on every packed token ``[T]`` (for the advantage estimator)."""
        cfg, lm = self.cfg, self.policy.lm
        h = batch.hidden(lm, packing=cfg.model.packing)  # [T, H]
        values = self.policy.value_head(h)  # [T]
        targets = batch.targets
        with self.engine.gathered(lm_head(lm)):
            old = token_logprobs(lm, h[batch.agent_rows], targets, temperature=cfg.loss.temperature,
                                 vocab_size=self.vocab_size, backend=cfg.loss.backend)
        return {"targets": targets, "old_logprobs": old, "old_values": values[batch.agent_rows]}, values

    def update(self, step: int, batch: StepBatch, rows: dict[str, torch.Tensor], teacher=None, *,
               value_only: bool = False) -> dict:
        """PPO epochs × minibatches over the step's episodes; the logged metrics of the update.

        ``value_only``: the value loss alone trains, and only the value head is stepped (the LM's gradients are
        dropped, so AdamW does not move it with old momentum either): the hand-over's value warm-up."""
        cfg, d = self.cfg, self.dist
        counts = batch.counts
        n_global = cfg.rollout.episodes_per_step
        g_counts = torch.zeros(n_global, dtype=torch.float64)
        g_counts[d.rank::d.world] = torch.tensor(counts, dtype=torch.float64)
        g_counts = d.all_reduce(g_counts.to(d.comm_device)).cpu().long().tolist()
        spare = max(range(len(counts)), key=lambda i: counts[i])  # a rank with nothing in a minibatch runs this
        if d.world > 1 and any(g_counts) and not counts[spare]:
            raise RuntimeError(f"rank {d.rank}: none of its episodes has an agent token; raise "
                               "rollout.max_episode_tokens")
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=1))
        tally = _Tally(self.n_turns)
        for _ in range(cfg.ppo.epochs):
            order = torch.randperm(n_global, generator=gen)
            for mb in order.chunk(cfg.ppo.minibatches):
                mb = mb.tolist()
                global_n = sum(g_counts[i] for i in mb)
                if global_n == 0:
                    continue
                idx = [i // d.world for i in mb if i % d.world == d.rank and g_counts[i] > 0]
                weight = d.world * sum(counts[i] for i in idx) / global_n
                self._minibatch(batch, rows, idx or [spare], weight, teacher, tally, value_only)
        self._step_scheduler()
        return tally.metrics(d)

    def skip(self) -> dict:
        """A step without an update (its teacher scores are missing): the LR schedule still follows the step."""
        self._step_scheduler()
        return {**_Tally(self.n_turns).metrics(self.dist), "teacher_skipped": True}

    def _step_scheduler(self) -> None:
        with warnings.catch_warnings():  # the LR schedule follows training steps, even fully skipped ones
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()

    def refresh_lr(self) -> None:
        """Sets the next step's LR again from the schedule (after the λ controller changed ``lr_factor``)."""
        s = self.scheduler
        for group, base, f in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas, strict=True):
            group["lr"] = base * f(s.last_epoch)
        s._last_lr = [group["lr"] for group in s.optimizer.param_groups]  # what get_last_lr() reports

    def _minibatch(self, batch: StepBatch, rows: dict, idx: list[int], weight: float, teacher, tally: _Tally,
                   value_only: bool = False):
        """One optimizer step on the episodes ``idx`` of this rank, their loss scaled by ``weight``."""
        sel = batch.agent_slices(idx)
        mb_rows = {k: v[sel] for k, v in rows.items()}
        sub = batch.select(idx)
        head = teacher.head() if teacher is not None else (None, None)
        with teacher.gathered() if teacher is not None else contextlib.nullcontext():
            res = self.engine(sub.packed, sub.agent_rows, packing=self.cfg.model.packing,
                              autocast=sub.device.type == "cuda", loss_fn=self._loss_fn(mb_rows, head, value_only))
            total = res["total"]
            if self.dist.any(not bool(torch.isfinite(total))):
                tally.skipped += 1
                return
            self.engine.backward(total * weight)
        if value_only:  # AdamW skips parameters without a gradient
            for p in self.policy.lm.parameters():
                p.grad = None
        gn = self.engine.step()
        if gn is None:
            tally.skipped += 1
            return
        tally.grad_norms.append(gn)
        if weight != 0:
            tally.add(res, len(sel), batch.agent_turns[sel])

    def _loss_fn(self, d: dict, teacher_head, value_only: bool = False):
        """The minibatch's loss from the student's hidden states (called inside the engine's forward)."""
        cfg = self.cfg
        w_t, b_t = teacher_head
        scores = {k: v for k, v in d.items() if k not in OWN_KEYS}
        if w_t is not None:
            scores.update(teacher_weight=w_t, teacher_bias=b_t)

        def loss_fn(h, v, w_s, b_s):
            out = atod_loss(
                h, w_s, d["targets"], d["old_logprobs"], d["advantages"], d["lam"],
                torch.ones_like(d["lam"], dtype=torch.bool), student_bias=b_s, **scores,
                divergence=cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta,
                temperature=cfg.loss.temperature, clip_eps_low=cfg.loss.clip_eps_low,
                clip_eps_high=cfg.loss.clip_eps_high, dual_clip=cfg.loss.dual_clip, kl_coef=cfg.loss.kl_coef,
                entropy_coef=cfg.loss.entropy_coef, vocab_size=self.vocab_size, backend=cfg.loss.backend,
            )
            if d.get("returns") is None:  # a critic-free estimator: the value head is not trained
                v_loss = (v * 0).sum()  # keeps the value head in the graph: DDP expects a gradient for it
                return {"total": out.loss + v_loss, "value_loss": v_loss, "out": out}
            v_loss = (v - d["returns"]) ** 2
            if cfg.ppo.value_clip is not None:
                v_clip = d["old_values"] + (v - d["old_values"]).clamp(-cfg.ppo.value_clip, cfg.ppo.value_clip)
                v_loss = torch.maximum(v_loss, (v_clip - d["returns"]) ** 2)
            v_loss = 0.5 * v_loss.mean()
            if value_only:  # the LM head stays in the graph (DDP) with no gradient
                return {"total": cfg.ppo.value_loss_coef * v_loss + 0.0 * out.loss, "value_loss": v_loss, "out": out}
            return {"total": out.loss + cfg.ppo.value_loss_coef * v_loss, "value_loss": v_loss, "out": out}

        return loss_fn
