"""Run under ``torchrun`` by tests/test_distributed.py; every rank writes a marker file when it got to the end.

    worker.py losses OUT_DIR ENGINE[,ENGINE...] -- key=value ...   two PPO updates on fixed episodes per engine
    worker.py cli OUT_DIR -- train ...                               ``atod-fast`` itself (atod_fast.cli.main)

``losses``: every rank plays the same global batch of episodes with the same sampling seed, keeps
its share (episodes rank, rank + world, ...) and runs ``prepare`` + ``update`` twice on it, so a
1-process and a 2-process run see the same global batch. Rank 0 writes the update metrics and the
final weights of every engine. Engines: none, ddp, zero2, zero3.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ENGINES = {"none": ["distributed.engine=none"], "ddp": ["distributed.engine=ddp"],
           "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
           "zero3": ["distributed.engine=deepspeed", "distributed.zero_stage=3",
                     "distributed.zero3_persistence_threshold=0"]}


def run_losses(out: Path, engines: list[str], overrides: list[str]) -> None:
    from safetensors.torch import save_file

    from atod_fast.trainer.config import load_train_config
    from atod_fast.trainer.rollout import play
    from atod_fast.trainer.seeds import train_seeds

    results = {}
    for name in engines:
        cfg = load_train_config(None, [*overrides, *ENGINES[name], f"output_dir={out / name}"])
        from atod_fast.trainer.loop import Trainer

        tr = Trainer(cfg)
        tr.setup(progress=False)
        d = tr.dist
        seeds = train_seeds(cfg.seed, 1, cfg.rollout.episodes_per_step)
        torch.manual_seed(1234)
        trajs = play(tr.models.policy.lm, tr.models.tokenizer, tr.rollout_engine.fmt, [cfg.env.make() for _ in seeds], seeds,
                     max_turns=tr.max_turns, max_new_tokens=cfg.rollout.max_new_tokens,
                     max_episode_tokens=cfg.rollout.max_episode_tokens, temperature=cfg.rollout.temperature,
                     device=tr.device, any_rank_active=d.any if tr.engine.zero3 else None)
        mine = trajs[d.rank::d.world]
        steps = []
        for step in (1, 2):
            m = tr.learner.update(step, *tr.prepare(step, mine), tr.teacher)
            steps.append({k: m[k] for k in ("loss", "distill", "pg", "value_loss", "entropy", "clipfrac",
                                            "grad_norm", "skipped_updates")})
        full = tr.engine.full_state_dict() if tr.engine.zero3 else tr.models.policy.state_dict()
        if d.is_main:
            save_file({k: v.detach().float().contiguous().clone() for k, v in full.items()
                       if k != "lm.lm_head.weight"}, str(out / f"weights-{name}.safetensors"))
            results[name] = steps
        d.barrier()
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(results))


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rest = sys.argv[sys.argv.index("--") + 1:]
    rank = int(os.environ.get("RANK", "0"))
    try:
        if mode == "losses":
            run_losses(out, sys.argv[3].split(","), rest)
            rc = 0
        else:
            from atod_fast.cli import main as cli_main

            rc = cli_main(rest)
    except Exception:
        traceback.print_exc()
        rc = 1
    if dist.is_initialized():
        if rc == 0:
            dist.barrier()
        dist.destroy_process_group()
    if rc == 0:
        (out / f"done-rank{rank}").write_text("ok")
    return rc


if __name__ == "__main__":
    sys.exit(main())
