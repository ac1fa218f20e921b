"""Training-episode summary of atod-fast train runs: gate step, success per 20 steps, value loss, held-out table.

Usage: python summarize.py RUN_DIR [RUN_DIR ...]   (prints markdown; RUN_DIR holds metrics.jsonl, maybe eval.json)
"""
import json
import math
import sys
from pathlib import Path


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


for run in map(Path, sys.argv[1:]):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    gate = next((r["handover_step"] for r in rows if r.get("handover_step") is not None), None)
    print(f"### {run.name}: {len(rows)} steps, handover_step {gate}, "
          f"threshold {rows[-1].get('gate_threshold', float('nan')):.3f}")
    print("| steps | training success | value loss | distill | mean λ |")
    print("|---|---|---|---|---|")
    for a in range(1, len(rows) + 1, 20):
        w = [r for r in rows if a <= r["step"] < a + 20]
        print(f"| {a}-{w[-1]['step']} | {mean(r['success_rate'] for r in w):.3f} | "
              f"{mean(r['value_loss'] for r in w):.4f} | {mean(r['distill'] for r in w):.3f} | "
              f"{mean(r['lambda_mean'] for r in w):.2f} |")
    if (run / "eval.json").is_file():
        ev = json.loads((run / "eval.json").read_text())
        t, s = ev["teacher"]["success_rate"], ev["student-after"]["success_rate"]
        n = ev["teacher"]["episodes"]
        se = math.sqrt(t * (1 - t) / n + s * (1 - s) / n)
        print(f"\nheld-out ({n} episodes): teacher {t:.3f}, student-before {ev['student-before']['success_rate']:.3f}, "
              f"student-after {s:.3f}; margin {s - t:+.3f} (s.e. of the difference {se:.3f})")
    print()
