"""``atod-fast export``: a checkpoint's student as a folder that transformers (or peft) loads on its own."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's student as a transformers folder",
                       description="Write the student of a checkpoint to --out: a transformers model folder (with "
                       "its tokenizer). A LoRA student is written as its adapter (peft's format) unless --merge "
                       "folds the adapter into the base weights.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its newest)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--merge", action="store_true", help="LoRA students: fold the adapter into the base weights")
    p.set_defaults(func=_cmd_export)


def _fail(msg: str) -> int:
    print(f"atod-fast: error: {msg}", file=sys.stderr)
    return 2


def _cmd_export(args) -> int:
    from ..trainer.checkpoint import resolve_checkpoint
    from ..trainer.config import ConfigError, load_train_config
    from ..trainer.lora import has_adapter

    out = Path(args.out)
    if out.exists():
        return _fail(f"--out: {out} already exists")
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = load_train_config(str(ckpt / "config.yaml"))
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    student = ckpt / "student"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if has_adapter(student) and args.merge:
        from ..trainer.lora import load_checkpoint_student, save_merged

        try:
            lm, tok = load_checkpoint_student(cfg, ckpt, progress=False)
        except (ConfigError, ValueError) as e:
            return _fail(str(e))
        save_merged(lm, tok, tmp)
    else:  # already a transformers folder, or the adapter (peft's format) as it is
        shutil.copytree(student, tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    kind = "merged model" if has_adapter(student) and args.merge else "adapter" if has_adapter(student) else "model"
    print(f"wrote {out} ({kind}, step {ckpt.name})")
    return 0
