"""Where the teacher's signal comes from: a dense local teacher, a served top-k teacher, sampled tokens alone.

Runs on-policy distillation (``schedule.mode=opd``: the teacher is the only signal, so its source is
what differs) with the same seeds, steps and held-out episodes three ways:

- ``dense``: the teacher model in the trainer's process, full distribution, reverse KL (the default);
- ``topk``: the same teacher behind ``atod-fast serve-teacher``, top-k prompt log-probs, forward KL;
- ``sampled``: the same server at k = 0, ``loss.divergence=sampled_reverse_kl``.

Each source is one ``atod-fast compare --methods opd`` grid under ``OUT/SOURCE`` (rerun to resume). The
table gives final held-out success (mean ± std over seeds, and per seed) and seconds per training step
(the median over each run's steps of rollout + teacher scoring + update), printed and saved as
``OUT/teacher_sources.json`` and ``.md``.

    python benchmarks/compare_teacher_sources.py --output-dir runs/sources --seeds 0,1,2 --max-steps 150 \\
        [key=value ...]        # shared overrides, e.g. env.name=... (the built-in teacher by default)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SOURCES = {
    "dense": [],
    "topk": ["loss.divergence=forward_kl", "model.teacher_topk={k}", "model.teacher_server={url}"],
    "sampled": ["loss.divergence=sampled_reverse_kl", "model.teacher_topk=0", "model.teacher_server={url}"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(overrides: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """``atod-fast serve-teacher --model builtin`` with the shared overrides (its sft.* make the same teacher)."""
    port = free_port()
    sft = [o for o in overrides if o.startswith(("sft.", "env."))]
    proc = subprocess.Popen([sys.executable, "-m", "atod_fast", "serve-teacher", "--model", "builtin", "--port",
                             str(port), *sft], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # the first call may build the teacher
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-teacher exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1.0)
    proc.kill()
    raise RuntimeError(f"serve-teacher did not answer at {url} within 600 s; see {log}")


def run_grid(out: Path, source: str, args, shared: list[str], url: str | None) -> dict:
    extra = [o.format(k=args.topk, url=url) for o in SOURCES[source]]
    cmd = [sys.executable, "-m", "atod_fast", "compare", "--output-dir", str(out / source), "--methods", "opd",
           "--seeds", args.seeds, "--max-steps", str(args.max_steps), "--eval-every", str(args.max_steps),
           "--eval-episodes", str(args.eval_episodes), "--jobs", str(args.jobs), *shared, *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=out)
    return json.loads((out / source / "results.json").read_text())


def step_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["rollout_s"] + r["update_s"] for r in rows)


def summarize(out: Path, results: dict[str, dict], seeds: list[int], args) -> dict:
    table = {}
    for source, res in results.items():
        finals = [res["runs"]["opd"][str(s)]["final"] for s in seeds]
        secs = [step_seconds(out / source / "runs" / "opd" / f"seed{s}") for s in seeds]
        table[source] = {"final_heldout_success": finals, "mean": statistics.mean(finals),
                         "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                         "s_per_step": secs, "s_per_step_median": statistics.median(secs)}
    return {"sources": table, "seeds": seeds, "max_steps": args.max_steps, "eval_episodes": args.eval_episodes,
            "topk": args.topk, "machine": machine(next(iter(results.values()))),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def machine(res: dict) -> str:
    """The machine a compare grid recorded in its results.json."""
    m = res["machine"]
    return f"{m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}" + (f", {m['gpu']}" if m.get("gpu") else "")


def markdown(summary: dict) -> str:
    lines = ["| teacher source | final held-out success (mean ± std) | per seed | s/step (median) |",
             "|---|---|---|---|"]
    names = {"dense": "dense local (reverse KL)", "topk": f"served top-{summary['topk']} (forward KL)",
             "sampled": "served, sampled tokens (sampled_reverse_kl, k = 0)"}
    for source, r in summary["sources"].items():
        per = ", ".join(f"{x:.3f}" for x in r["final_heldout_success"])
        lines.append(f"| {names[source]} | {r['mean']:.3f} ± {r['std']:.3f} | {per} | {r['s_per_step_median']:.2f} |")
    lines.append("")
    lines.append(f"{len(summary['seeds'])} seeds, {summary['max_steps']} steps of schedule.mode=opd, "
                 f"{summary['eval_episodes']} held-out episodes; {summary['machine']}; {summary['date']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--eval-episodes", type=int, default=256)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--sources", default=",".join(SOURCES), help=f"a subset of {','.join(SOURCES)}")
    p.add_argument("overrides", nargs="*", help="key=value overrides shared by every run")
    args = p.parse_args(argv)
    sources = args.sources.split(",")
    if bad := [s for s in sources if s not in SOURCES]:
        p.error(f"--sources: expected a subset of {','.join(SOURCES)}, got {','.join(bad)}")
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    proc, url = serve(args.overrides, out / "serve-teacher.log") if set(sources) - {"dense"} else (None, None)
    try:
        results = {s: run_grid(out, s, args, args.overrides, url) for s in sources}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    summary = summarize(out, results, seeds, args)
    (out / "teacher_sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (out / "teacher_sources.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
