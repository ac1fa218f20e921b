"""Time per training step of two checkouts, side by side on a shared (noisy) machine.

Each checkout runs in its own worker process (its source tree first on ``PYTHONPATH``) that
builds a ``Trainer`` of the same config and then runs steps when told to. The driver
alternates: ``--block`` steps in A, the same steps in B, the next ones in A, ... so both
see the same machine load, and reports the median seconds per step (and per phase: rollout,
update) of each.

    python benchmarks/ab_step_time.py --a /tmp/old-src --b . --steps 12 --block 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys, time
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]  # PYTHONPATH's tree
from atod_fast.trainer.config import load_train_config
from atod_fast.trainer.loop import Trainer
cfg = load_train_config(None, sys.argv[1:])
tr = Trainer(cfg)
tr.setup(progress=False)
import atod_fast
print(json.dumps({"ready": True, "src": atod_fast.__file__}), flush=True)
for line in sys.stdin:
    step = int(line)
    t0 = time.perf_counter()
    m = tr.step(step)
    print(json.dumps({"step": step, "s": time.perf_counter() - t0, "rollout_s": m["rollout_s"],
                      "update_s": m["update_s"], "loss": m["loss"], "reward_mean": m["reward_mean"]}), flush=True)
"""


def start(src: Path, overrides: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    p = subprocess.Popen([sys.executable, "-c", WORKER, f"output_dir={out}", "logging.progress=false",
                          "logging.tensorboard=false", *overrides], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env, cwd=out.parent)  # not the checkout: "" on sys.path is the cwd
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker of {src} exited before it was ready")
        if line.startswith("{") and (msg := json.loads(line)).get("ready"):
            print(f"worker of {src}: atod_fast from {msg['src']}", file=sys.stderr)
            if not Path(msg["src"]).resolve().is_relative_to(src.resolve()):
                raise RuntimeError(f"the worker of {src} imported atod_fast from {msg['src']}")
            return p


def run_step(p: subprocess.Popen, step: int) -> dict:
    p.stdin.write(f"{step}\n")
    p.stdin.flush()
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("a worker exited")
        if line.startswith("{"):
            return json.loads(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="source tree A (holds the atod_fast package)")
    ap.add_argument("--b", type=Path, required=True, help="source tree B")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--block", type=int, default=2, help="steps per turn of each worker")
    ap.add_argument("--skip", type=int, default=1, help="first steps left out of the medians (warm-up)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-step records here")
    ap.add_argument("--b-set", action="append", default=[], metavar="key.sub=value",
                    help="an override for B alone (e.g. cpu_threads=2), repeatable")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workers = {name: start(src, [*args.overrides, *extra], Path(tmp) / name)
                   for name, src, extra in (("a", args.a, []), ("b", args.b, args.b_set))}
        recs = {"a": [], "b": []}
        for first in range(1, args.steps + 1, args.block):
            for name, p in workers.items():
                for step in range(first, min(first + args.block, args.steps + 1)):
                    recs[name].append(run_step(p, step))
        for p in workers.values():
            p.stdin.close()
            p.wait()
    res = {}
    for name, rs in recs.items():
        kept = [r for r in rs if r["step"] > args.skip]
        res[name] = {k: statistics.median(r[k] for r in kept) for k in ("s", "rollout_s", "update_s")}
    print(json.dumps({"a": str(args.a), "b": str(args.b), "median": res,
                      "speedup": res["a"]["s"] / res["b"]["s"]}, indent=2))
    same = all(ra["loss"] == rb["loss"] and ra["reward_mean"] == rb["reward_mean"]
               for ra, rb in zip(recs["a"], recs["b"], strict=True))
    print("identical loss and reward per step:", same)
    if args.json:
        args.json.write_text(json.dumps({"records": recs, "median": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
