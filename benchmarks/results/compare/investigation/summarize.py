"""Summaries of the schedule and hand-over investigation runs (training-episode success, held-out finals).

Usage: python summarize.py EXPLORE_DIR OUT_DIR, where EXPLORE_DIR holds one run directory per name (atod-fast
train --output-dir EXPLORE_DIR/NAME --max-steps 60 seed=S ...), cmds.txt (NAME overrides, one per line) and
heldout.txt (NAME + the JSON line of `atod-fast eval --checkpoint NAME --episodes 256 --no-compare --json`).
"""
import json, statistics, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
def rows(run): return [json.loads(l) for l in open(src / run / "metrics.jsonl")]
def win(r, a, b, k="success_rate"):
    xs = [x[k] for x in r if a <= x["step"] <= b]; return sum(xs) / len(xs)
held = {}
for line in open(src / "heldout.txt"):
    name, js = line.split(" ", 1); held[name] = json.loads(js)["success_rate"]
out = {"schedule_seed7": {}, "handover": {}}
(dst / "schedule-seed7").mkdir(parents=True, exist_ok=True)
(dst / "handover-from-opd150").mkdir(parents=True, exist_ok=True)
lines = ["# Schedule at 60 steps, training seed 7 (training-episode success, 32 episodes per step)", "",
         "| run | overrides | 16-30 | 31-45 | 46-60 | mean λ 46-60 |", "|---|---|---|---|---|---|"]
ov = {l.split()[0]: " ".join(l.split()[1:]) for l in open(src / "cmds.txt")}
for run in ("opd", "atod", "atod-T120", "atod-min0.5", "opd-lr1e-3", "atod-lr1e-3"):
    r = rows(run); assert len(r) == 60
    (dst / "schedule-seed7" / f"{run}.metrics.jsonl").write_text((src / run / "metrics.jsonl").read_text())
    w = [win(r, a, a + 14) for a in (16, 31, 46)]
    out["schedule_seed7"][run] = {"overrides": ov[run], "success_16_30": w[0], "success_31_45": w[1], "success_46_60": w[2]}
    lines.append(f"| {run} | `{ov[run]}` | {w[0]:.3f} | {w[1]:.3f} | {w[2]:.3f} | {win(r, 46, 60, 'lambda_mean'):.2f} |")
(dst / "schedule-seed7" / "summary.md").write_text("\n".join(lines) + "\n")
lines = ["# Hand-over: 60 more steps from the OPD student of the 150-step run (held-out 0.449 on 256 episodes; "
         "teacher 0.477 on the same episodes)", "",
         "Training-episode success per 15 steps (32 episodes per step) and held-out success of the final student "
         "(256 episodes, temperature 1).", "",
         "| run | seed | 1-15 | 16-30 | 31-45 | 46-60 | held-out final |", "|---|---|---|---|---|---|---|"]
for base in ("h-opd", "h-atod", "h-opd-lr2e-4", "h-atod-lr2e-4"):
    for seed, suf in ((7, ""), (8, "-s8"), (9, "-s9")):
        run = base + suf
        if not (src / run / "metrics.jsonl").exists() or run not in held: continue
        r = rows(run)
        if len(r) != 60: continue
        (dst / "handover-from-opd150" / f"{run}.metrics.jsonl").write_text((src / run / "metrics.jsonl").read_text())
        w = [win(r, a, a + 14) for a in (1, 16, 31, 46)]
        out["handover"][run] = {"seed": seed, "windows": w, "heldout_final": held[run]}
        lines.append(f"| {base} | {seed} | " + " | ".join(f"{x:.3f}" for x in w) + f" | {held[run]:.3f} |")
for base in ("h-opd", "h-atod", "h-opd-lr2e-4", "h-atod-lr2e-4"):
    rs = [v for k, v in out["handover"].items() if k == base or k.startswith(base + "-s")]
    if rs:
        lines.append(f"| {base} mean | {len(rs)} seeds | " + " | ".join(f"{statistics.fmean(v['windows'][i] for v in rs):.3f}" for i in range(4))
                     + f" | {statistics.fmean(v['heldout_final'] for v in rs):.3f} |")
(dst / "handover-from-opd150" / "summary.md").write_text("\n".join(lines) + "\n")
(dst / "schedule-and-handover.json").write_text(json.dumps(out, indent=1))
print("\n".join(lines))
