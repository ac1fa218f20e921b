"""Subcommands ``train``, ``eval``, ``sft`` and ``plot`` of the ``atod-fast`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train a student with ATOD (no arguments: the built-in default, CPU-sized)",
                       description="Train a student with ATOD. Without arguments: a tiny agent on guess_number, "
                       "with a built-in teacher made (and cached) by `atod-fast sft`; minutes on a laptop CPU.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (see --print-config for every key)")
    p.add_argument("--output-dir", help="run directory (config.output_dir)")
    p.add_argument("--max-steps", type=int, help="training steps (config.max_steps)")
    p.add_argument("--seed", type=int, help="seed (config.seed)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint of the output dir "
                   "(auto; a fresh run when there is none) or from a checkpoint directory")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. ppo.epochs=4")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="held-out success of a trained student (with teacher and initial student)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its newest)")
    p.add_argument("--episodes", type=int, help="held-out episodes (default: the run's eval.episodes)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-compare", action="store_true", help="evaluate only the checkpoint's student")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the run's)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("sft", help="supervised warm-up on an environment's scripted expert",
                       description="Train a model on demonstrations of an environment's scripted expert (this is "
                       "how the built-in teacher is made). Without init: a tiny model with a built-in tokenizer.")
    p.add_argument("--config", metavar="FILE.yaml")
    p.add_argument("--output-dir", help="where the model is saved (config.output_dir)")
    p.add_argument("--seed", type=int)
    p.add_argument("--print-config", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. sft.steps=200 env.name=hanoi")
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("compare", help="teacher vs OPD vs PPO vs ATOD (and ablations), methods × seeds",
                       description="Train every method on every seed with one shared config (methods differ only "
                       "in schedule.*), evaluate on held-out seeds during training, and write results.json, "
                       "results.md and PNG plots. Rerun the same command to resume: finished runs are skipped.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config shared by every run")
    p.add_argument("--output-dir", default="runs/compare", help="grid directory (default: runs/compare)")
    p.add_argument("--methods", default=",".join(_compare_methods()),
                   help=f"comma-separated subset of {','.join(_compare_methods())} (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    p.add_argument("--max-steps", type=int, default=150, help="training steps of every run (default: 150)")
    p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps (default: 25)")
    p.add_argument("--eval-episodes", type=int, default=128, help="held-out episodes per point (default: 128)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at the same time (default: 1)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="shared config overrides")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("plot", help="write PNG curves of a run (success, reward, λ by turn, loss terms)")
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    p.set_defaults(func=_cmd_plot)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "wandb"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the training progress bar
    hf_logging.set_verbosity_error()


def _overrides(args, flags: dict[str, str]) -> list[str]:
    out = list(args.overrides)
    for attr, key in flags.items():
        v = getattr(args, attr, None)
        if v is not None:
            out.append(f"{key}={v}")
    return out


def _fail(e: Exception) -> int:
    print(f"atod-fast: error: {e}", file=sys.stderr)
    return 2


def _resolve_config(loader, args, flags: dict[str, str]):
    """``(config, None)`` to go on with, or ``(None, exit code)`` after a config error or --print-config.

    Every check that is cheap runs here, before a model loads: the config itself, then what it asks of
    this machine (the models it names exist, its metric sinks are installed).
    """
    from ..trainer.config import ConfigError, check_machine, to_yaml

    try:
        cfg = loader(args.config, _overrides(args, flags))
    except ConfigError as e:
        return None, _fail(e)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None, 0
    try:
        check_machine(cfg)
    except ConfigError as e:
        return None, _fail(e)
    _setup_logging()
    return cfg, None


def _cmd_train(args) -> int:
    from ..trainer.config import ConfigError, load_train_config

    cfg, code = _resolve_config(load_train_config, args, {"output_dir": "output_dir", "max_steps": "max_steps",
                                                          "seed": "seed"})
    if cfg is None:
        return code
    from ..trainer.loop import NonFiniteLossError, Trainer

    trainer, ok = None, False
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.train()
        ok = True
    except ConfigError as e:
        return _fail(e)
    except NonFiniteLossError as e:
        print(f"atod-fast: {e}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:  # under torchrun: barrier (when all went well) and destroy the process group
            trainer.dist.shutdown(barrier=ok)
    return 0


def _cmd_eval(args) -> int:
    from ..trainer.checkpoint import resolve_checkpoint
    from ..trainer.config import BUILTIN, ConfigError, load_train_config
    from ..trainer.models import check_model_source

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        overrides = [f"device={args.device}"] if args.device else []
        cfg = load_train_config(str(ckpt / "config.yaml"), overrides)
        if args.episodes is not None and args.episodes < 1:
            raise ConfigError(f"--episodes: expected an integer >= 1, got {args.episodes}")
        if not args.no_compare and cfg.model.teacher not in (None, BUILTIN):
            check_model_source("model.teacher", cfg.model.teacher)
    except (ConfigError, ValueError) as e:
        return _fail(e)
    _setup_logging()
    from ..trainer.checkpoint import read_meta
    from ..trainer.distributed import resolve_device
    from ..trainer.evaluation import compare, eval_kwargs, evaluate_model, format_table
    from ..trainer.loading import teacher_location
    from ..trainer.lora import load_checkpoint_student
    from ..trainer.models import check_same_tokenizer, load_causal_lm

    device = resolve_device(cfg.device)
    episodes = args.episodes or cfg.eval.episodes
    try:
        lm, tok = load_checkpoint_student(cfg, ckpt, progress=not args.json)  # a LoRA one: base + adapter
    except ValueError as e:
        return _fail(e)
    lm.to(device)
    name = f"checkpoint (step {read_meta(ckpt)['step']})"
    if args.no_compare:
        rows = {name: evaluate_model(lm, tok, **eval_kwargs(cfg, device, episodes))}
    else:
        teacher_path = teacher_location(cfg, progress=not args.json)
        teacher = None
        if teacher_path is not None:
            teacher, t_tok = load_causal_lm(teacher_path, dtype=cfg.model.dtype,
                                            trust_remote_code=cfg.model.trust_remote_code)
            check_same_tokenizer(tok, t_tok, str(ckpt), teacher_path, "teacher")
            teacher.to(device).eval()
        rows = compare(cfg, lm, tok, teacher, teacher_path, device, episodes=episodes, student_name=name)
    mine = rows[name]
    if args.json:
        print(json.dumps({**mine, "checkpoint": str(ckpt), "step": read_meta(ckpt)["step"], "env": cfg.env.name,
                          "compare": {k: v for k, v in rows.items() if k != name}}))
    else:
        print(f"Held-out evaluation ({episodes} episodes of {cfg.env.name}, temperature {cfg.eval.temperature}):\n")
        print(format_table(rows))
    return 0


def _cmd_sft(args) -> int:
    from ..trainer.config import load_sft_config

    cfg, code = _resolve_config(load_sft_config, args, {"output_dir": "output_dir", "seed": "seed"})
    if cfg is None:
        return code
    from ..trainer.sft import run_sft

    try:
        out = run_sft(cfg)
    except ValueError as e:
        return _fail(e)
    print(f"saved to {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except (ValueError, ImportError) as e:
        return _fail(e)
    for p in paths:
        print(p)
    return 0


def _compare_methods() -> tuple[str, ...]:
    from .compare import DEFAULT_METHODS

    return DEFAULT_METHODS


def _cmd_compare(args) -> int:
    from pathlib import Path

    from ..trainer.config import ConfigError
    from .compare import Grid, run_grid

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        return _fail(ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}"))
    try:
        grid = Grid(output_dir=Path(args.output_dir), config=args.config, overrides=list(args.overrides),
                    methods=[m.strip() for m in args.methods.split(",") if m.strip()], seeds=seeds,
                    max_steps=args.max_steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                    jobs=args.jobs)
        _setup_logging()
        t0 = time.perf_counter()
        res = run_grid(grid, log=lambda msg: print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", flush=True))
    except (ConfigError, ValueError) as e:
        return _fail(e)
    print()
    print((grid.output_dir / "results.md").read_text(), end="")
    print(f"\nwritten: {', '.join(res['written'])}")
    return 1 if res["failed"] else 0
