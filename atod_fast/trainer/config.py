"""Typed configuration of ``atod-fast train`` and ``atod-fast sft``.

Every section is a keyword-only dataclass with a docstring per field. Files and command-line
overrides are parsed by omegaconf (``load_train_config``): a YAML file, then ``key.sub=value``
overrides, checked against the dataclasses. Any mistake is reported as one line naming the key
and what was expected (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..ops.losses.inputs import DIVERGENCES
from ..ops.schedule import schedule_problem


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


def _need(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(kw_only=True)
class TinyArch:
    """Shape of a small random-init Llama built in-process (no download)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size must be divisible by it)."""
    intermediate_size: int = 128
    """Width of the MLP."""
    max_positions: int = 1024
    """Longest sequence the rotary embedding is configured for."""

    def check(self, key: str) -> None:
        for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            v = getattr(self, f)
            _need(_int(v) and v >= 1, f"{key}.{f}", "an integer >= 1", v)
        _need(self.hidden_size % self.num_heads == 0, f"{key}.num_heads",
              f"a divisor of hidden_size={self.hidden_size}", self.num_heads)


BUILTIN = "builtin"


@dataclass(kw_only=True)
class LoraSettings:
    """LoRA adapters on the student (peft): only they and the value head train."""

    r: int = 0
    """Rank of the adapters; 0: no LoRA (every student parameter trains)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    target_modules: list[str] | None = None
    """Names of the linear modules that get adapters (e.g. [q_proj, v_proj]); null: peft's default for the
    architecture."""

    def check(self) -> None:
        _need(_int(self.r) and self.r >= 0, "model.lora.r", "an integer >= 0", self.r)
        _need(_num(self.alpha) and self.alpha > 0, "model.lora.alpha", "a number > 0", self.alpha)
        _need(_num(self.dropout) and 0 <= self.dropout < 1, "model.lora.dropout", "a number in [0, 1)", self.dropout)
        t = self.target_modules
        _need(t is None or (len(t) > 0 and all(isinstance(m, str) and m for m in t)), "model.lora.target_modules",
              "null or a non-empty list of module names", t)


@dataclass(kw_only=True)
class ModelConfig:
    """Which models play student, teacher and reference."""

    student: str = BUILTIN
    """Student causal LM: "builtin" (tiny random-init Llama over the built-in tokenizer), a hub name or a local path."""
    teacher: str | None = BUILTIN
    """Frozen teacher: "builtin" (SFT on the environment's scripted expert, cached), a hub name, a path, or null."""
    reference: str | None = None
    """KL reference when loss.kl_coef > 0: null means a frozen copy of the initial student."""
    student_arch: TinyArch = field(default_factory=TinyArch)
    """Shape of the built-in student."""
    chat_template: str | None = None
    """Jinja chat template to use instead of the tokenizer's own (needed for models without one)."""
    dtype: str = "float32"
    """Weight dtype of the loaded models: float32 or bfloat16 (bf16 autocast on CUDA is separate)."""
    trust_remote_code: bool = False
    """Passed to transformers' from_pretrained."""
    packing: str = "auto"
    """Training forwards: packed (one row, position ids), padded, or auto (packed with flash-attention)."""
    attn_implementation: str | None = None
    """transformers attn_implementation of loaded models (e.g. flash_attention_2, sdpa); null: transformers' choice."""
    liger: bool = False
    """Apply Liger-Kernel's patches (RMSNorm, RoPE, SwiGLU) to the student; the LM head stays with the fused loss."""
    teacher_server: str | None = None
    """URL of a teacher behind vLLM's completions API (``vllm serve``, ``atod-fast serve-teacher``) scoring the
    trajectories' token ids with top-k prompt log-probs (a sparse teacher: loss.divergence=forward_kl, or the sampled
    tokens' own log-probs: sampled_reverse_kl). The model
    at model.teacher is then not loaded (a built-in student still takes its tokenizer from it). Needs the serve
    extra."""
    teacher_topk: int = 20
    """k of the served teacher: prompt_logprobs per position (vllm serve refuses k above its --max-logprobs); 0 with
    loss.divergence=sampled_reverse_kl, which needs only each sampled token's own log-prob."""
    teacher_timeout_s: float = 120.0
    """Seconds one scoring request to the teacher server may take before it is retried."""
    teacher_retries: int = 3
    """Retries of a failed or timed-out scoring request (exponential backoff); then the step is skipped."""
    teacher_max_inflight: int = 8
    """Scoring requests (one per trajectory) in flight at once, per rank."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters on the student (model.lora.r > 0; needs the lora extra)."""

    def __post_init__(self):
        t = self.teacher_server
        _need(t is None or (isinstance(t, str) and t.startswith(("http://", "https://"))), "model.teacher_server",
              "null or an http:// or https:// URL", t)
        _need(_int(self.teacher_topk) and self.teacher_topk >= 0, "model.teacher_topk", "an integer >= 0",
              self.teacher_topk)
        _need(_num(self.teacher_timeout_s) and self.teacher_timeout_s > 0, "model.teacher_timeout_s",
              "a number > 0", self.teacher_timeout_s)
        for f in ("teacher_retries", "teacher_max_inflight"):
            lo = 0 if f == "teacher_retries" else 1
            _need(_int(getattr(self, f)) and getattr(self, f) >= lo, f"model.{f}", f"an integer >= {lo}",
                  getattr(self, f))
        _need(isinstance(self.student, str) and self.student != "", "model.student", "a model name or path",
              self.student)
        _need(self.dtype in ("float32", "bfloat16"), "model.dtype", "float32 or bfloat16", self.dtype)
        _need(self.packing in ("auto", "packed", "padded"), "model.packing", "auto, packed or padded", self.packing)
        self.student_arch.check("model.student_arch")
        self.lora.check()


# The embedded default plays guess_number on 1..31 with 5 guesses: bisection always wins there, so
# an expert that errs leaves its teacher room to be beaten.
DEFAULT_ENV_KWARGS: dict[str, dict[str, Any]] = {"guess_number": {"low": 1, "high": 31, "max_turns": 5}}


@dataclass(kw_only=True)
class EnvConfig:
    """The environment, built with ``atod_fast.envs.make(name, **kwargs)``."""

    name: str = "guess_number"
    """A built-in name (``atod-fast envs`` lists them), an entry point of group ``atod_fast.envs``, or
    ``package.module:ClassOrFactory`` (any importable class or function returning an environment)."""
    kwargs: dict[str, Any] | None = None
    """Keyword arguments of the environment's constructor; null: the built-in defaults (guess_number: 1..31,
    5 guesses; other environments: their own defaults)."""
    step_timeout_s: float | None = None
    """Time limit of one reset or step in seconds (for environments that can hang: a JVM, a remote service);
    a step over it ends its episode as failed, with a log line. null: no limit."""

    def __post_init__(self):
        from ..envs import EnvSpecError, resolve

        try:
            resolve(self.name)
        except EnvSpecError as e:
            raise ConfigError(str(e)) from None
        t = self.step_timeout_s
        _need(t is None or (_num(t) and t > 0), "env.step_timeout_s", "null or a number > 0", t)

    def resolved_kwargs(self) -> dict[str, Any]:
        return dict(DEFAULT_ENV_KWARGS.get(self.name, {}) if self.kwargs is None else self.kwargs)

    def make(self, **extra):
        """A new environment; bad keyword arguments are a ConfigError naming env.kwargs."""
        from ..envs import EnvSpecError, make

        kwargs = self.resolved_kwargs()
        try:
            return make(self.name, step_timeout_s=self.step_timeout_s, **kwargs, **extra)
        except EnvSpecError as e:
            raise ConfigError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"env.kwargs: {self.name} rejects {kwargs}: {e}") from None


@dataclass(kw_only=True)
class RolloutConfig:
    """How episodes are played by the student."""

    episodes_per_step: int = 32
    """Episodes played (in one batch) per training step."""
    max_new_tokens: int = 8
    """Token limit of one agent turn; a turn that reaches it is sent to the environment as is."""
    max_turns: int | None = None
    """Agent turns per episode before truncation (bootstrapped); null: the environment's max_turns."""
    max_episode_tokens: int = 1024
    """Token budget of one episode: a turn starts only if its longest reply fits (the observation after it is
    kept whole); an episode stopped by it is truncated and bootstrapped."""
    temperature: float = 1.0
    """Sampling temperature of the student during training rollouts."""
    engine: str = "hf"
    """Generation engine: hf (transformers generate) or vllm (a colocated vLLM engine per rank, needs CUDA and the
    vllm package; the student's weights are synced into it after every update)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory vLLM may take for weights and KV cache (rollout.engine=vllm)."""
    reward: str = "env"
    """What the PPO terms learn from. env: the environment's rewards; success: 1 at an episode's last turn when it
    succeeded, else 0 (for environments whose reward pays partial credit, e.g. textarena's GuessTheNumber pays
    for the closeness of a losing guess, so that raising the reward need not raise the wins). Metrics on training
    episodes (reward_mean) then report the reward learned from; held-out evaluation always reports the
    environment's."""
    group_size: int | None = None
    """Episodes that share an environment seed (consecutive episodes of a step, a group); episodes_per_step must
    be a multiple of it. null: 1 under ppo.advantage=gae, 8 under grpo (whose baseline is the group's mean)."""

    def __post_init__(self):
        _need(self.engine in ("hf", "vllm"), "rollout.engine", "hf or vllm", self.engine)
        _need(self.reward in ("env", "success"), "rollout.reward", "env or success", self.reward)
        _need(_num(self.vllm_gpu_memory_utilization) and 0 < self.vllm_gpu_memory_utilization < 1,
              "rollout.vllm_gpu_memory_utilization", "a number in (0, 1)", self.vllm_gpu_memory_utilization)
        for f in ("episodes_per_step", "max_new_tokens", "max_episode_tokens"):
            _need(_int(getattr(self, f)) and getattr(self, f) >= 1, f"rollout.{f}", "an integer >= 1",
                  getattr(self, f))
        _need(self.group_size is None or (_int(self.group_size) and self.group_size >= 1), "rollout.group_size",
              "null or an integer >= 1", self.group_size)
        _need(self.max_turns is None or (_int(self.max_turns) and self.max_turns >= 1), "rollout.max_turns",
              "null or an integer >= 1", self.max_turns)
        _need(_num(self.temperature) and self.temperature > 0, "rollout.temperature", "a number > 0",
              self.temperature)


ANNEAL_STEPS = 60
"""Default length of the anneal after the hand-over gate (schedule.anneal_steps)."""


@dataclass(kw_only=True)
class ScheduleConfig:
    """λ(t, τ): the weight of distillation against PPO per token (see ``AnnealSchedule``)."""

    mode: str = "atod"
    """atod (annealed in step and turn), opd (λ ≡ 1, distillation only) or rl (λ ≡ 0, PPO only)."""
    handover: str = "auto"
    """mode=atod only. auto: λ holds at lambda_max until the student has caught up with its teacher on training
    episodes (the gate_* keys), then anneals over anneal_steps (docs/handover.md); fixed: λ anneals from step 0
    over total_steps. A served teacher (model.teacher_server) cannot play episodes for the gate's bar: there the
    run is fixed (a warning says so)."""
    total_steps: int | None = None
    """handover=fixed: steps over which λ anneals in time; null: max_steps."""
    anneal_steps: int | None = ANNEAL_STEPS
    """handover=auto: steps over which λ anneals after the gate (and the value warm-up); null: the rest of the run."""
    gate_window: int = 10
    """handover=auto: the gate looks at the mean of the last this many steps."""
    gate_ratio: float = 0.9
    """handover=auto: open the gate when the student's training success (window mean) is >= this × the teacher's
    success on training-distribution episodes (measured once, cached beside the teacher)."""
    gate_divergence: float | None = None
    """handover=auto: also open the gate when the mean distillation divergence (window mean of the step's masked
    per-token mean) is below this; null: success alone."""
    turn_horizon: int | None = None
    """Turns over which λ anneals in the turn index; null: the rollout's turn limit."""
    lambda_max: float = 0.9
    """λ of the first turn at step 0."""
    lambda_min: float = 0.1
    """Floor of λ."""
    time_decay: str = "cosine"
    """Decay over steps: cosine, linear, exponential or constant."""
    turn_decay: str = "cosine"
    """Decay over turns: cosine, linear, exponential or constant (turn_weighting=position)."""
    turn_weighting: str = "position"
    """mode=atod only. position: λ decays with the turn index (turn_decay); adaptive: each turn's λ is the step's
    λ times a weight from the student–teacher disagreement and the teacher's certainty on that turn in recent
    steps, bounded to [lambda_min, lambda_max] (docs/method.md, "Adaptive turn weights")."""
    turn_ema: float = 0.8
    """turn_weighting=adaptive: decay of the per-turn moving averages of disagreement and teacher entropy (the weight
    of the old average at each step)."""

    def __post_init__(self):
        _need(self.mode in ("atod", "opd", "rl"), "schedule.mode", "one of atod, opd, rl", self.mode)
        _need(self.turn_weighting in ("position", "adaptive"), "schedule.turn_weighting", "position or adaptive",
              self.turn_weighting)
        _need(self.turn_weighting == "position" or self.mode == "atod", "schedule.turn_weighting",
              "position unless schedule.mode=atod (opd and rl have one λ for every turn)", self.turn_weighting)
        _need(_num(self.turn_ema) and 0 <= self.turn_ema < 1, "schedule.turn_ema", "a number in [0, 1)",
              self.turn_ema)
        _need(self.handover in ("auto", "fixed"), "schedule.handover", "auto or fixed", self.handover)
        if self.mode == "atod":  # each anneal length belongs to one hand-over
            _need(self.handover == "fixed" or self.total_steps is None, "schedule.total_steps",
                  "null under schedule.handover=auto (the anneal after the gate lasts schedule.anneal_steps)",
                  self.total_steps)
            _need(self.handover == "auto" or self.anneal_steps == ANNEAL_STEPS, "schedule.anneal_steps",
                  "its default under schedule.handover=fixed (the anneal lasts schedule.total_steps)",
                  self.anneal_steps)
        for f in ("anneal_steps",):
            v = getattr(self, f)
            _need(v is None or (_int(v) and v >= 1), f"schedule.{f}", "null or an integer >= 1", v)
        _need(_int(self.gate_window) and self.gate_window >= 1, "schedule.gate_window", "an integer >= 1",
              self.gate_window)
        _need(_num(self.gate_ratio) and self.gate_ratio >= 0, "schedule.gate_ratio", "a number >= 0",
              self.gate_ratio)
        _need(self.gate_divergence is None or (_num(self.gate_divergence) and self.gate_divergence > 0),
              "schedule.gate_divergence", "null or a number > 0", self.gate_divergence)
        for f in ("total_steps", "turn_horizon"):
            v = getattr(self, f)
            _need(v is None or (_int(v) and v >= 1), f"schedule.{f}", "null or an integer >= 1", v)
        bad = schedule_problem(lambda_max=self.lambda_max, lambda_min=self.lambda_min, time_decay=self.time_decay,
                               turn_decay=self.turn_decay)
        if bad is not None:
            _need(False, f"schedule.{bad[0]}", *bad[1:])


@dataclass(kw_only=True)
class LossConfig:
    """Hyperparameters of ``atod_loss``."""

    divergence: str = "reverse_kl"
    """Distillation divergence: reverse_kl, forward_kl, jsd, or sampled_reverse_kl (from the teacher's log-prob of
    each sampled token alone: works with a served teacher at model.teacher_topk=0; docs/method.md)."""
    jsd_beta: float = 0.5
    """β of the generalized JSD; 0 is forward_kl and 1 reverse_kl (TRL's and Liger's convention)."""
    temperature: float = 1.0
    """Logit temperature of student and teacher inside the loss."""
    clip_eps_low: float = 0.2
    """Lower PPO ratio clip."""
    clip_eps_high: float = 0.2
    """Upper PPO ratio clip."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages, or null."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the reference (0: no reference model is loaded)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    backend: str = "auto"
    """atod_loss backend; auto picks the fastest available."""

    def __post_init__(self):
        _need(self.divergence in DIVERGENCES, "loss.divergence", f"one of {', '.join(DIVERGENCES)}", self.divergence)
        _need(_num(self.jsd_beta) and 0 <= self.jsd_beta <= 1, "loss.jsd_beta", "a number in [0, 1]", self.jsd_beta)
        _need(_num(self.temperature) and self.temperature > 0, "loss.temperature", "a number > 0", self.temperature)
        for f in ("clip_eps_low", "clip_eps_high", "kl_coef", "entropy_coef"):
            _need(_num(getattr(self, f)) and getattr(self, f) >= 0, f"loss.{f}", "a number >= 0", getattr(self, f))
        _need(self.dual_clip is None or (_num(self.dual_clip) and self.dual_clip > 1), "loss.dual_clip",
              "null or a number > 1", self.dual_clip)


@dataclass(kw_only=True)
class PPOConfig:
    """PPO update: epochs over the step's episodes, GAE and the value head."""

    epochs: int = 2
    """Passes over the step's episodes."""
    minibatches: int = 2
    """Minibatches per epoch (episodes are split between them); one optimizer step each."""
    gamma: float = 1.0
    """Discount per agent token (observation tokens are skipped)."""
    gae_lambda: float = 0.95
    """GAE λ (not the ATOD λ)."""
    value_loss_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    value_clip: float | None = 0.2
    """Clip range of the value update around the rollout values (null: unclipped)."""
    whiten_advantages: bool = True
    """advantage=gae: normalize advantages to zero mean and unit variance over the step's agent tokens (grpo's are
    normalized within each group already)."""
    advantage: str = "gae"
    """gae (a value head, GAE over the packed turns) or grpo (critic-free: each episode's return normalized within
    its group of rollout.group_size episodes on one seed, on all its agent tokens; no value head is trained)."""
    value_warmup_steps: int = 0
    """schedule.handover=auto: steps after the gate that train the value head alone (policy loss off)."""

    def __post_init__(self):
        for f in ("epochs", "minibatches"):
            _need(_int(getattr(self, f)) and getattr(self, f) >= 1, f"ppo.{f}", "an integer >= 1", getattr(self, f))
        for f in ("gamma", "gae_lambda"):
            _need(_num(getattr(self, f)) and 0 <= getattr(self, f) <= 1, f"ppo.{f}", "a number in [0, 1]",
                  getattr(self, f))
        _need(_num(self.value_loss_coef) and self.value_loss_coef >= 0, "ppo.value_loss_coef", "a number >= 0",
              self.value_loss_coef)
        _need(self.value_clip is None or (_num(self.value_clip) and self.value_clip > 0), "ppo.value_clip",
              "null or a number > 0", self.value_clip)
        _need(self.advantage in ("gae", "grpo"), "ppo.advantage", "gae or grpo", self.advantage)
        _need(_int(self.value_warmup_steps) and self.value_warmup_steps >= 0, "ppo.value_warmup_steps",
              "an integer >= 0", self.value_warmup_steps)
        _need(self.advantage == "gae" or self.value_warmup_steps == 0, "ppo.value_warmup_steps",
              "0 under ppo.advantage=grpo (no value head is trained)", self.value_warmup_steps)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (stepped once per training step)."""

    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.99
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule: str = "constant"
    """After warm-up: constant, linear or cosine (to lr·min_lr_ratio at max_steps)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr for the linear and cosine schedules."""
    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive steps with a non-finite loss."""
    handover_lr_scale: float = 0.1
    """schedule.handover=auto: the learning rate is multiplied by this from the first step after the gate."""

    def __post_init__(self):
        _need(_num(self.lr) and self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _need(_num(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", "a number >= 0",
              self.weight_decay)
        for f in ("beta1", "beta2"):
            _need(_num(getattr(self, f)) and 0 <= getattr(self, f) < 1, f"optim.{f}", "a number in [0, 1)",
                  getattr(self, f))
        _need(_num(self.eps) and self.eps > 0, "optim.eps", "a number > 0", self.eps)
        _need(self.max_grad_norm is None or (_num(self.max_grad_norm) and self.max_grad_norm > 0),
              "optim.max_grad_norm", "null or a number > 0", self.max_grad_norm)
        _need(_int(self.warmup_steps) and self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0",
              self.warmup_steps)
        _need(self.lr_schedule in ("constant", "linear", "cosine"), "optim.lr_schedule",
              "one of constant, linear, cosine", self.lr_schedule)
        _need(_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]",
              self.min_lr_ratio)
        _need(_int(self.max_nonfinite_steps) and self.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps",
              "an integer >= 1", self.max_nonfinite_steps)
        _need(_num(self.handover_lr_scale) and self.handover_lr_scale > 0, "optim.handover_lr_scale",
              "a number > 0", self.handover_lr_scale)


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written (always also at the end) and how many are kept."""

    every: int = 50
    """Write a checkpoint every this many steps."""
    keep_last: int = 2
    """Number of most recent checkpoints kept."""

    def __post_init__(self):
        _need(_int(self.every) and self.every >= 1, "checkpoint.every", "an integer >= 1", self.every)
        _need(_int(self.keep_last) and self.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1",
              self.keep_last)


@dataclass(kw_only=True)
class LoggingConfig:
    """Progress display and metric files."""

    progress: bool = True
    """Show a progress bar (step, tokens/s, reward, success, mean λ)."""
    tensorboard: bool = True
    """Also write TensorBoard events (needs the tensorboard package: pip install 'atod-fast[viz]')."""
    log_every: int = 10
    """Print a metrics line every this many steps when the progress bar is off."""
    wandb: bool = False
    """Also log every step's metrics to Weights & Biases (pip install 'atod-fast[wandb]'). Its files go under
    OUTPUT_DIR/wandb; with WANDB_MODE=offline they stay there, no network (upload later with ``wandb sync``)."""
    wandb_project: str = "atod-fast"
    """W&B project of the run."""
    wandb_run_name: str | None = None
    """W&B display name of the run; null: the name of output_dir."""

    def __post_init__(self):
        _need(_int(self.log_every) and self.log_every >= 1, "logging.log_every", "an integer >= 1", self.log_every)
        _need(isinstance(self.wandb_project, str) and self.wandb_project.strip() != ""
              and not any(c in self.wandb_project for c in "/\\#?%:"), "logging.wandb_project",
              "a project name (not empty, none of / \\ # ? % :)", self.wandb_project)
        _need(self.wandb_run_name is None or (isinstance(self.wandb_run_name, str) and self.wandb_run_name.strip()),
              "logging.wandb_run_name", "null or a non-empty name", self.wandb_run_name)

    def check_installed(self) -> None:
        """The sinks asked for can run here (a check of this machine, so not part of loading a config)."""
        import importlib.util

        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb: the wandb package is not installed (pip install 'atod-fast[wandb]', "
                              "or set logging.wandb=false)")


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation (seeds disjoint from every training seed)."""

    episodes: int = 256
    """Held-out episodes per evaluated model."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    at_end: bool = True
    """At the end of train, print teacher vs student-before vs student-after success."""
    every: int = 0
    """Also evaluate the student during training, every this many steps and at the last step (0: never); the
    step's metrics get heldout_success_rate and heldout_reward_mean (for held-out learning curves)."""

    def __post_init__(self):
        _need(_int(self.episodes) and self.episodes >= 1, "eval.episodes", "an integer >= 1", self.episodes)
        _need(_int(self.every) and self.every >= 0, "eval.every", "an integer >= 0", self.every)
        _need(_num(self.temperature) and self.temperature >= 0, "eval.temperature", "a number >= 0",
              self.temperature)


@dataclass(kw_only=True)
class DistributedConfig:
    """Data-parallel training over processes started by ``torchrun`` (one per GPU, or several on a CPU)."""

    engine: str = "none"
    """none (one process), ddp (torch DistributedDataParallel) or deepspeed (ZeRO, ``deepspeed.initialize``)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states in CPU memory (ZeRO stage >= 1)."""
    offload_param: bool = False
    """DeepSpeed: keep parameters in CPU memory between uses (ZeRO stage 3 only)."""
    zero3_persistence_threshold: int | None = None
    """DeepSpeed stage3_param_persistence_threshold: parameters with fewer elements stay unsharded; null: DeepSpeed's
    default (1e5). Tiny models need 0 to be sharded at all."""
    teacher_zero3: bool = False
    """Shard the frozen teacher with ZeRO-3 inference (engine deepspeed), for teachers that do not fit one device."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_minutes: int = 30
    """Timeout of collective operations; a rank waiting longer fails instead of hanging."""

    def __post_init__(self):
        _need(self.engine in ("none", "ddp", "deepspeed"), "distributed.engine", "one of none, ddp, deepspeed",
              self.engine)
        _need(_int(self.zero_stage) and 0 <= self.zero_stage <= 3, "distributed.zero_stage", "an integer in 0..3",
              self.zero_stage)
        _need(self.backend in ("auto", "nccl", "gloo"), "distributed.backend", "auto, nccl or gloo", self.backend)
        _need(_int(self.timeout_minutes) and self.timeout_minutes >= 1, "distributed.timeout_minutes",
              "an integer >= 1", self.timeout_minutes)
        t = self.zero3_persistence_threshold
        _need(t is None or (_int(t) and t >= 0), "distributed.zero3_persistence_threshold",
              "null or an integer >= 0", t)
        if self.engine != "deepspeed":
            for f in ("offload_optimizer", "offload_param", "teacher_zero3"):
                _need(not getattr(self, f), f"distributed.{f}", "false unless distributed.engine=deepspeed", True)
        _need(not self.offload_optimizer or self.zero_stage >= 1, "distributed.offload_optimizer",
              "false with zero_stage 0 (offloading needs ZeRO stage >= 1)", True)
        _need(not self.offload_param or self.zero_stage == 3, "distributed.offload_param",
              "false unless zero_stage is 3", True)



@dataclass(kw_only=True)
class SftConfig:
    """Supervised training on the environment's scripted expert (how the built-in teacher is made)."""

    arch: TinyArch = field(default_factory=lambda: TinyArch(hidden_size=128, num_layers=2, num_heads=4,
                                                            intermediate_size=256))
    """Shape of the model trained from scratch (when no init model is given)."""
    expert_error_rate: float = 0.25
    """Rate of the expert's mistakes in the demonstrations: leaves the teacher room to be beaten."""
    episodes: int = 4000
    """Expert demonstrations generated."""
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 32
    """Episodes per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, cosine decay)."""
    vocab_size: int = 320
    """Size of the built-in byte-level BPE tokenizer trained on the demonstrations."""

    def __post_init__(self):
        self.arch.check("sft.arch")
        _need(_num(self.expert_error_rate) and 0 <= self.expert_error_rate <= 1, "sft.expert_error_rate",
              "a number in [0, 1]", self.expert_error_rate)
        for f in ("episodes", "steps", "batch_size"):
            _need(_int(getattr(self, f)) and getattr(self, f) >= 1, f"sft.{f}", "an integer >= 1", getattr(self, f))
        _need(_num(self.lr) and self.lr > 0, "sft.lr", "a number > 0", self.lr)
        _need(_int(self.vocab_size) and self.vocab_size >= 300, "sft.vocab_size", "an integer >= 300",
              self.vocab_size)


@dataclass(kw_only=True)
class TrainConfig:
    """``atod-fast train``."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    seed: int = 0
    """Seed of model init, environment seeds, sampling and minibatch order."""
    max_steps: int = 250
    """Training steps (one rollout batch and one PPO update each)."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    cpu_threads: int | None = None
    """torch threads on CPU; null: torch's default (OMP_NUM_THREADS, else the cores), except that the tiny built-in
    models decode token by token (rollouts, evaluation) on 1 thread: a decode step's ops are too small to split, and
    on a loaded machine threads waiting on each other cost more than they give. Batched passes (scoring, updates, a
    rollout turn's prefill) gain from threads even at the tiny sizes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    """How the built-in teacher is made (used when model.teacher is "builtin")."""

    def __post_init__(self):
        _need(_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _need(_int(self.max_steps) and self.max_steps >= 1, "max_steps", "an integer >= 1", self.max_steps)
        _need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
              "auto, cpu, cuda or cuda:N", self.device)
        _need(self.cpu_threads is None or (_int(self.cpu_threads) and self.cpu_threads >= 1), "cpu_threads",
              "null or an integer >= 1", self.cpu_threads)
        _need(self.ppo.value_warmup_steps == 0 or self.distributed.engine != "deepspeed", "ppo.value_warmup_steps",
              "0 with distributed.engine=deepspeed (the warm-up steps the value head alone)",
              self.ppo.value_warmup_steps)
        _need(not (self.gated and self.distributed.teacher_zero3), "schedule.handover",
              "fixed with distributed.teacher_zero3 (auto measures the teacher on one rank)", self.schedule.handover)
        if self.schedule.mode != "rl" and self.model.teacher_server is None:
            _need(self.model.teacher is not None, "model.teacher",
                  f"a teacher for schedule.mode={self.schedule.mode} (null only with mode rl)", None)
        if self.model.teacher_server is not None:  # a top-k teacher (forward KL) or the sampled tokens' log-probs
            _need(self.loss.divergence in ("forward_kl", "sampled_reverse_kl"), "loss.divergence",
                  "forward_kl or sampled_reverse_kl with model.teacher_server", self.loss.divergence)
            _need(self.model.teacher_topk >= 1 or self.loss.divergence == "sampled_reverse_kl", "model.teacher_topk",
                  ">= 1 with loss.divergence=forward_kl (0 only with sampled_reverse_kl)", self.model.teacher_topk)
        g, n = self.group_size, self.rollout.episodes_per_step
        _need(self.ppo.advantage == "gae" or g >= 2, "rollout.group_size",
              "an integer >= 2 under ppo.advantage=grpo (a singleton group's advantage is 0)", g)
        _need(n % g == 0, "rollout.episodes_per_step", f"a multiple of rollout.group_size={g}", n)

    @property
    def group_size(self) -> int:
        """Episodes per environment seed: rollout.group_size, or its default for the advantage estimator."""
        if self.rollout.group_size is not None:
            return self.rollout.group_size
        return 8 if self.ppo.advantage == "grpo" else 1

    @property
    def gated(self) -> bool:
        """λ is held until the progress gate opens (schedule.handover=auto under mode=atod, with a local teacher)."""
        return self.schedule.mode == "atod" and self.schedule.handover == "auto" and self.model.teacher_server is None


@dataclass(kw_only=True)
class SftRunConfig:
    """``atod-fast sft``."""

    output_dir: str = "runs/sft"
    """Where the trained model and tokenizer are saved (transformers format)."""
    seed: int = 0
    """Seed of the demonstrations, model init and batch order."""
    init: str | None = None
    """Model to fine-tune (hub name or path); null: a tiny random-init model of sft.arch with a built-in tokenizer."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    env: EnvConfig = field(default_factory=EnvConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    """Only chat_template, dtype and trust_remote_code are used."""


def check_machine(cfg: TrainConfig | SftRunConfig) -> None:
    """What a config asks of this machine, before anything expensive: the models it names exist here (or in
    reach on the hub) and its metric sinks are installed. Kept out of loading, which also reads the configs of
    checkpoints made elsewhere."""
    from .models import check_model_source

    if isinstance(cfg, SftRunConfig):
        if cfg.init is not None:
            check_model_source("init", cfg.init)
        return
    m = cfg.model
    if m.student != BUILTIN:
        check_model_source("model.student", m.student)
    if m.teacher not in (None, BUILTIN):
        check_model_source("model.teacher", m.teacher)
    if m.reference is not None and cfg.loss.kl_coef > 0:
        check_model_source("model.reference", m.reference)
    cfg.logging.check_installed()


def _read_yaml(path: Path):
    import yaml

    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {what}") from None
    if not OmegaConf.is_dict(data):
        raise ConfigError(f"--config: {path} must hold a mapping of keys (like ppo: {{epochs: 2}}), got a "
                          f"{type(OmegaConf.to_container(data)).__name__}")
    return data


def _load(schema: type, path: str | None, overrides: list[str]):
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"--config: file not found: {path}")
            cfg = OmegaConf.merge(cfg, _read_yaml(p))
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r}: expected key.sub=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        if "not in" in msg:
            msg = f"unknown key; {msg}"
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def load_train_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults < YAML file < ``key.sub=value`` overrides, validated."""
    return _load(TrainConfig, path, list(overrides))


def load_sft_config(path: str | None = None, overrides: list[str] = ()) -> SftRunConfig:
    return _load(SftRunConfig, path, list(overrides))


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or plain data)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys that may change when resuming a run (everything else must match the checkpoint's config).
RESUMABLE_KEYS = ("output_dir", "max_steps", "device", "checkpoint", "logging", "eval")
# Where the teacher is served and how it is asked may change (a restarted server on another host), not whether.
RESUMABLE_SUBKEYS = ("model.teacher_server", "model.teacher_timeout_s", "model.teacher_retries",
                     "model.teacher_max_inflight")


def incompatible_keys(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Top-level fields whose values differ in ways that make resuming meaningless."""
    out = []
    for f in fields(TrainConfig):
        if f.name in RESUMABLE_KEYS:
            continue
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if hasattr(a, "__dataclass_fields__"):
            out += [f"{f.name}.{g.name}" for g in fields(a) if getattr(a, g.name) != getattr(b, g.name)
                    and not (f"{f.name}.{g.name}" in RESUMABLE_SUBKEYS and None not in (getattr(a, g.name),
                                                                                         getattr(b, g.name)))]
        elif a != b:
            out.append(f.name)
    return out
