"""Loading a run's models and its resume point: student, teacher, reference, and the checkpoint to resume from.

Owns which model each config key names (``model.student``, ``model.teacher``, ``model.reference``),
how the built-in ones are found or built, the student's weights from a checkpoint, and the
checks that a ``--resume`` checkpoint fits this run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_rank_rng, load_trainer_state, read_meta, set_rng_state
from .config import BUILTIN, ConfigError, TrainConfig, incompatible_keys, load_train_config
from .distributed import shard_teacher_zero3
from .models import Policy, check_same_tokenizer, freeze, lm_head, load_causal_lm, tiny_llama


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


@dataclass
class Models:
    policy: Policy
    tokenizer: object
    teacher: torch.nn.Module | None
    reference: torch.nn.Module | None


def _frozen(cfg: TrainConfig, path: str, tok, role: str):
    m = cfg.model
    model, other = load_causal_lm(path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                  attn_implementation=m.attn_implementation)
    check_same_tokenizer(tok, other, m.student, path, role)
    return freeze(model)


def load_models(cfg: TrainConfig, teacher_path: str | None, *, device: torch.device, world: int,
                resume_from: Path | None) -> Models:
    """The student (with its value head, on ``device``, in train mode), its tokenizer, the frozen teacher and,
    with ``loss.kl_coef > 0``, the frozen reference."""
    lm, tok = initial_student(cfg, teacher_path)
    if cfg.model.liger:
        from .models import apply_liger

        apply_liger(lm)
    if cfg.model.lora.r > 0:  # before the reference is copied: it starts as the same (adapted) student
        from .lora import apply_lora

        apply_lora(lm, cfg.model.lora, seed=cfg.seed)
    teacher = None
    if teacher_path is not None and cfg.model.teacher_server is None:  # a served teacher is asked over HTTP
        teacher = _frozen(cfg, teacher_path, tok, "teacher")
        if cfg.distributed.teacher_zero3:
            teacher = shard_teacher_zero3(teacher, cfg.distributed, device, world)
        else:
            teacher = teacher.to(device)
    reference = None
    if cfg.loss.kl_coef > 0:
        if cfg.model.reference is None:
            reference = freeze(copy.deepcopy(lm))
        else:
            reference = _frozen(cfg, cfg.model.reference, tok, "reference")
        reference = reference.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        policy = Policy(lm)
    if resume_from is not None and cfg.distributed.engine != "deepspeed":
        load_student_weights(policy, resume_from)
    policy.to(device).train()
    return Models(policy, tok, teacher, reference)


def loss_vocab_size(models: Models) -> int | None:
    """The loss's ``vocab_size``: the tokenizer's size when student and teacher heads are padded to different
    sizes over one tokenizer, else None (whole heads)."""
    if models.teacher is not None and lm_head(models.teacher)[0].shape[0] != lm_head(models.policy.lm)[0].shape[0]:
        return len(models.tokenizer)
    return None


def load_student_weights(policy: Policy, ckpt: Path) -> None:
    """The student LM and value head of a checkpoint into ``policy`` (DeepSpeed restores its own)."""
    from safetensors.torch import load_file

    from .lora import has_adapter, load_adapter
    from .models import load_value_head

    if has_adapter(ckpt / "student"):  # a LoRA student: the base is rebuilt from the config, the adapter loaded
        load_adapter(policy.lm, ckpt / "student")
        load_value_head(policy.value_head, ckpt / "value_head.safetensors")
        return
    state = {}
    for f in sorted((ckpt / "student").glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = policy.lm.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(policy.lm)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the student: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    load_value_head(policy.value_head, ckpt / "value_head.safetensors")


def _tied_keys(lm) -> set[str]:
    keys = getattr(lm, "_tied_weights_keys", None) or []
    return set(keys.keys()) if isinstance(keys, dict) else set(keys)


def find_resume(run_dir: Path, resume: str | None, cfg: TrainConfig, world: int) -> Path | None:
    """The checkpoint ``--resume`` names (``auto``: the newest in ``run_dir``, or none), checked against this run."""
    if resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"--output-dir: {run_dir} already holds checkpoints; pass --resume auto to "
                              "continue that run, or choose another output directory")
        return None
    ckpt = latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if resume == "auto" and ckpt is None:
        return None  # nothing to resume: a fresh run
    if ckpt is None or not (ckpt / "meta.json").is_file():
        raise ConfigError(f"--resume: {resume} is not a complete checkpoint directory")
    saved = load_train_config(str(ckpt / "config.yaml"))
    bad = incompatible_keys(saved, cfg)
    if bad:
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(bad)}; "
                          f"resume with the saved config ({ckpt / 'config.yaml'}) or start a new output dir")
    saved_world = read_meta(ckpt).get("world_size", 1)
    if saved_world != world:
        raise ConfigError(f"--resume: {ckpt} was written by {saved_world} process(es), this run has {world}; "
                          "each rank plays its own episodes and holds its own shard, so resume on as many")
    return ckpt


def restore_training_state(ckpt: Path, *, engine, scheduler, rank: int) -> dict:
    """The optimizer (through the engine), LR scheduler and this rank's RNG states of ``ckpt``; returns the saved
    trainer state (``step`` and the extra ``state`` the trainer saved)."""
    st = load_trainer_state(ckpt)
    engine.load_engine_state(ckpt / "deepspeed", st)
    scheduler.load_state_dict(st["scheduler"])
    set_rng_state(load_rank_rng(ckpt, rank) or st["rng"])
    return st
