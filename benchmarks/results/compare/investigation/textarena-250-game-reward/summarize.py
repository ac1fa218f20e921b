"""Summary of the 250-step textarena runs that learned from the game's own reward (seed 0, four methods).

    python summarize.py RUNS_DIR > summary.json

RUNS_DIR is the compare output's ``runs/`` folder. Per method: training-episode success and reward
averaged over blocks of 25 steps, λ and the learning rate at the block starts, the gate step, and the
held-out evaluations (success, reward) every 50 steps.
"""

import json
import sys
from pathlib import Path


def blocks(rows, key, width=25):
    vals = [r[key] for r in rows]
    return [round(sum(vals[i:i + width]) / len(vals[i:i + width]), 3) for i in range(0, len(vals), width)]


def main(runs: Path) -> dict:
    out = {}
    for path in sorted(runs.glob("*/seed0/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in rows if "success_rate" in r]
        out[path.parts[-3]] = {
            "train_success_per_25_steps": blocks(train, "success_rate"),
            "train_reward_per_25_steps": blocks(train, "reward_mean"),
            "lambda_mean_at_block_start": [round(train[i]["lambda_mean"], 3) for i in range(0, len(train), 25)],
            "lr_at_block_start": [train[i].get("lr") for i in range(0, len(train), 25)],
            "handover_step": train[-1].get("handover_step"),
            "heldout": [{"step": r["step"], "success": r["heldout_success_rate"], "reward": round(r["heldout_reward_mean"], 4)}
                        for r in rows if "heldout_success_rate" in r],
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
