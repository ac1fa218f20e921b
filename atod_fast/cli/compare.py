"""``atod-fast compare``: teacher vs OPD vs PPO vs ATOD (and ablations), methods × seeds, end to end.

Every training run is an ordinary ``atod-fast train`` in a subprocess, with its own run
directory (``OUT/runs/METHOD/seedS``) and ``--resume auto``: a grid that crashes or is killed
loses nothing that finished, and running the same command again skips the finished runs and
resumes the others. All methods of a seed share one config and differ only in ``schedule.*``;
each gets the same steps, episodes per step and PPO updates. Held-out success is measured with
the trainer's ``eval.every`` on the evaluation seeds (never used for training), plus step 0
(the initial student, the same for every method of a seed) and the teacher, once.

Outputs in ``OUT``: ``results.json``, ``results.md`` (the table), ``success_vs_step.png`` and
``final_success.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..trainer.config import ConfigError, TrainConfig, load_train_config

# name -> (description, schedule overrides); None: evaluation only (the teacher).
METHODS: dict[str, tuple[str, list[str] | None]] = {
    "teacher": ("the frozen teacher, evaluated only", None),
    "opd": ("on-policy distillation, λ ≡ 1", ["schedule.mode=opd"]),
    "ppo": ("PPO from the reward only, λ ≡ 0", ["schedule.mode=rl"]),
    "atod": ("ATOD: distils until caught up with the teacher, then cosine decay in step and turn",
             ["schedule.mode=atod", "schedule.time_decay=cosine", "schedule.turn_decay=cosine"]),
    "atod-fixed": ("ATOD with the anneal from step 0 (no hand-over gate)",
                   ["schedule.mode=atod", "schedule.handover=fixed", "schedule.time_decay=cosine",
                    "schedule.turn_decay=cosine"]),
    "atod-adaptive": ("ATOD with adaptive turn weights: more teacher weight on turns of disagreement with a confident "
                      "teacher", ["schedule.mode=atod", "schedule.turn_weighting=adaptive"]),
    "atod-grpo": ("ATOD with critic-free advantages: returns normalized within groups of episodes on one seed",
                  ["schedule.mode=atod", "ppo.advantage=grpo"]),
    "atod-no-turn": ("ATOD without turn-awareness: λ depends on the step only",
                     ["schedule.mode=atod", "schedule.time_decay=cosine", "schedule.turn_decay=constant"]),
    "atod-linear": ("ATOD with linear decay in step and turn", ["schedule.mode=atod", "schedule.time_decay=linear",
                                                                "schedule.turn_decay=linear"]),
}
DEFAULT_METHODS = tuple(METHODS)


@dataclass(kw_only=True)
class Grid:
    """One comparison: the shared config, the methods, the seeds and the evaluation cadence."""

    output_dir: Path
    """Where the runs, results.json, results.md and the plots go."""
    config: str | None = None
    """YAML config shared by every run (null: the built-in default)."""
    overrides: list[str] = field(default_factory=list)
    """``key.sub=value`` overrides shared by every run (``schedule.*`` is the method's)."""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Method names (keys of METHODS)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds (model init, training episodes, sampling); evaluation seeds are fixed and disjoint."""
    max_steps: int = 150
    """Training steps of every run."""
    eval_every: int = 25
    """Held-out evaluation every this many steps (and at the last step)."""
    eval_episodes: int = 128
    """Held-out episodes per evaluation point."""
    jobs: int = 1
    """Training runs at the same time (subprocesses)."""

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"--methods: expected a comma-separated subset of {', '.join(METHODS)}, got "
                              f"{','.join(self.methods) or 'nothing'}")
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--methods/--seeds: expected no repeats")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ConfigError(f"--seeds: expected integers >= 0, got {self.seeds}")
        for name in ("max_steps", "eval_every", "eval_episodes", "jobs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v!r}")
        for o in self.overrides:
            key = o.split("=", 1)[0]
            if key.startswith("schedule.") and key not in ("schedule.lambda_max", "schedule.lambda_min",
                                                           "schedule.total_steps", "schedule.turn_horizon",
                                                           "schedule.anneal_steps", "schedule.gate_window",
                                                           "schedule.gate_ratio", "schedule.gate_divergence",
                                                           "schedule.turn_ema"):
                raise ConfigError(f"override {o!r}: the methods set schedule.mode and the decays themselves")
            if key in ("seed", "max_steps", "output_dir") or key.startswith("eval."):
                raise ConfigError(f"override {o!r}: set by compare (use --seeds, --max-steps, --eval-every, "
                                  "--eval-episodes, --output-dir)")

    # ------------------------------------------------------------ configs
    def common_overrides(self) -> list[str]:
        return [*self.overrides, f"max_steps={self.max_steps}", f"eval.every={self.eval_every}",
                f"eval.episodes={self.eval_episodes}", "eval.at_end=false", "logging.progress=false"]

    def run_overrides(self, method: str, seed: int) -> list[str]:
        out = [*self.common_overrides(), *METHODS[method][1], f"seed={seed}",
               f"output_dir={self.run_dir(method, seed)}"]
        return out

    def run_config(self, method: str, seed: int) -> TrainConfig:
        return load_train_config(self.config, self.run_overrides(method, seed))

    def run_dir(self, method: str, seed: int) -> Path:
        return self.output_dir / "runs" / method / f"seed{seed}"

    def trained(self) -> list[str]:
        return [m for m in self.methods if METHODS[m][1] is not None]


def run_finished(cfg: TrainConfig) -> bool:
    from ..trainer.metrics import read_metrics

    run = Path(cfg.output_dir)
    rows = read_metrics(run)
    return (bool(rows) and rows[-1]["step"] == cfg.max_steps and "heldout_success_rate" in rows[-1]
            and (run / "checkpoints" / f"step-{cfg.max_steps:06d}" / "meta.json").is_file())


def curve(cfg: TrainConfig, key: str = "heldout_success_rate") -> list[tuple[int, float]]:
    """(step, held-out metric) at every evaluation point of a run; ``key``: heldout_success_rate or
    heldout_reward_mean."""
    from ..trainer.metrics import read_metrics

    return [(r["step"], r[key]) for r in read_metrics(cfg.output_dir) if key in r]


# ---------------------------------------------------------------- evaluation in this process
def _cached_json(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
    return value


def baseline_evals(grid: Grid, log) -> tuple[dict | None, dict[int, dict]]:
    """Teacher (built first, so parallel runs never race to build it) and each seed's initial student."""
    import torch

    from ..trainer.distributed import resolve_device
    from ..trainer.evaluation import eval_kwargs, evaluate_model
    from ..trainer.loading import initial_student, teacher_location
    from ..trainer.models import load_causal_lm
    from ..trainer.threads import decode_threads

    method = grid.trained()[0] if grid.trained() else "teacher"
    cfg = load_train_config(grid.config, [*grid.common_overrides(), *(METHODS[method][1] or [])])
    torch.set_num_threads(decode_threads(cfg))  # this process only evaluates
    teacher_path = teacher_location(cfg, progress=False)
    device = resolve_device(cfg.device)
    kw = eval_kwargs(cfg, device, grid.eval_episodes)
    out = grid.output_dir / "evals"
    teacher = None
    if teacher_path is not None and "teacher" in grid.methods:
        def make_teacher():
            lm, tok = load_causal_lm(teacher_path, dtype=cfg.model.dtype,
                                     trust_remote_code=cfg.model.trust_remote_code)
            return {**evaluate_model(lm.to(device), tok, **kw), "path": str(teacher_path)}

        teacher = _cached_json(out / "teacher.json", make_teacher)
        log(f"teacher: held-out success {teacher['success_rate']:.3f} ({grid.eval_episodes} episodes)")
    before = {}
    if grid.trained():
        for seed in grid.seeds:
            def make_before(seed=seed):
                c = load_train_config(grid.config, grid.run_overrides(grid.trained()[0], seed))
                lm, tok = initial_student(c, teacher_path)
                with torch.no_grad():
                    return evaluate_model(lm.to(device), tok, **kw)

            before[seed] = _cached_json(out / f"student-before-seed{seed}.json", make_before)
    return teacher, before


# ---------------------------------------------------------------- the grid
def _train_cmd(grid: Grid, method: str, seed: int) -> list[str]:
    cmd = [sys.executable, "-m", "atod_fast", "train", "--resume", "auto"]
    if grid.config is not None:
        cmd += ["--config", grid.config]
    return cmd + grid.run_overrides(method, seed)


def run_grid(grid: Grid, *, log=print) -> dict:
    """Train every (method, seed) not finished yet, then write results.json, results.md and the plots."""
    t_start = time.perf_counter()
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    # Every run's config is checked here, before anything starts.
    configs = {(m, s): grid.run_config(m, s) for m in grid.trained() for s in grid.seeds}
    teacher, before = baseline_evals(grid, log)
    todo = [(m, s) for s in grid.seeds for m in grid.trained() if not run_finished(configs[m, s])]
    total, n_done = len(configs), len(configs) - len(todo)
    n_before = n_done
    if n_done:
        log(f"{n_done} of {total} runs already finished; skipping them")
    running: dict[tuple[str, int], tuple[subprocess.Popen, float, object]] = {}
    failed: dict[str, str] = {}
    wall: dict[tuple[str, int], float] = {}
    t_grid = time.perf_counter()
    while todo or running:
        while todo and len(running) < grid.jobs:
            m, s = todo.pop(0)
            d = grid.run_dir(m, s)
            d.mkdir(parents=True, exist_ok=True)
            logf = (d / "train.log").open("a")
            # Runs side by side share the cores (cores // jobs threads each); through the environment, so that
            # --jobs is not part of a run's config and may change on resume.
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // grid.jobs))}
            running[m, s] = (subprocess.Popen(_train_cmd(grid, m, s), stdout=logf, stderr=subprocess.STDOUT,
                                              env=env),
                             time.perf_counter(), logf)
            log(f"start {m} seed {s}  (log: {d / 'train.log'})")
        time.sleep(0.5)
        for key, (proc, t0, logf) in list(running.items()):
            if proc.poll() is None:
                continue
            logf.close()
            del running[key]
            m, s = key
            n_done += 1
            wall[key] = time.perf_counter() - t0
            if proc.returncode != 0 or not run_finished(configs[key]):
                failed[f"{m}/seed{s}"] = f"exit code {proc.returncode}; see {grid.run_dir(m, s) / 'train.log'}"
                log(f"[{n_done}/{total}] FAILED {m} seed {s} (exit code {proc.returncode}); see its train.log")
                continue
            left = len(todo) + len(running)
            per = (time.perf_counter() - t_grid) / max(sum(1 for k in wall if k not in failed), 1)
            log(f"[{n_done}/{total}] {m} seed {s}: held-out success {curve(configs[key])[-1][1]:.3f} "
                f"({wall[key]:.0f} s; about {per * left / 60:.0f} min left)")
    previous = _previous_results(grid.output_dir)
    for (m, s), w in _previous_run_walls(previous).items():
        wall.setdefault((m, s), w)  # runs finished by an earlier invocation keep their own time
    invocation = {"wall_s": time.perf_counter() - t_start, "commit": _git_commit(),
                  "runs_trained": total - n_before - len(failed), "runs_failed": len(failed)}
    results = collect(grid, configs, teacher, before, wall, failed, wall_s=invocation["wall_s"])
    results["invocations"] = [*_previous_invocations(previous), invocation]
    results["written"] = [str(p) for p in write_report(grid.output_dir, results, log=log)]
    return results


# ---------------------------------------------------------------- results
def _previous_results(out: Path) -> dict | None:
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _previous_invocations(prev: dict | None) -> list[dict]:
    """Earlier invocations of this grid (results.json written before ``invocations`` existed: one)."""
    if prev is None:
        return []
    if "invocations" in prev:
        return prev["invocations"]
    n = sum(len(v) for v in prev.get("runs", {}).values())
    return [{"wall_s": prev["wall_s"], "commit": prev.get("commit"), "runs_trained": n,
             "runs_failed": len(prev.get("failed", {}))}]


def _previous_run_walls(prev: dict | None) -> dict[tuple[str, int], float]:
    if prev is None:
        return {}
    return {(m, int(s)): r["wall_s"] for m, per in prev.get("runs", {}).items() for s, r in per.items()
            if r.get("wall_s") is not None}


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "torch": torch.__version__, "python": platform.python_version()}


def _spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def collect(grid: Grid, configs: dict, teacher: dict | None, before: dict[int, dict], wall: dict, failed: dict,
            *, wall_s: float) -> dict:
    runs: dict[str, dict[str, dict]] = {}
    summary: dict[str, dict] = {}
    for m in grid.trained():
        runs[m] = {}
        for s in grid.seeds:
            cfg = configs[m, s]
            if not run_finished(cfg):
                continue
            pts = [(0, before[s]["success_rate"]), *curve(cfg)]
            rew = [(0, before[s]["reward_mean"]), *curve(cfg, "heldout_reward_mean")]
            runs[m][str(s)] = {"curve": pts, "final": pts[-1][1],
                               "mean_over_steps": statistics.fmean(y for x, y in pts if x > 0),
                               "reward_curve": rew, "final_reward": rew[-1][1], "wall_s": wall.get((m, s))}
        if runs[m]:
            summary[m] = {k: _spread([r[key] for r in runs[m].values()]) for k, key in (
                ("final", "final"), ("mean_over_steps", "mean_over_steps"), ("final_reward", "final_reward"))}
    base = configs[grid.trained()[0], grid.seeds[0]] if grid.trained() else None
    if teacher is not None:
        p, n = teacher["success_rate"], teacher["episodes"]
        teacher = {**teacher, "stderr": math.sqrt(p * (1 - p) / n)}
    return {
        "env": {"name": base.env.name, "kwargs": base.env.resolved_kwargs()} if base else None,
        "config": grid.config, "overrides": grid.overrides, "methods": {m: METHODS[m][0] for m in grid.methods},
        "method_overrides": {m: METHODS[m][1] for m in grid.trained()},
        "seeds": grid.seeds, "max_steps": grid.max_steps, "eval_every": grid.eval_every,
        "eval_episodes": grid.eval_episodes, "episodes_per_step": base.rollout.episodes_per_step if base else None,
        "ppo": {"epochs": base.ppo.epochs, "minibatches": base.ppo.minibatches} if base else None,
        "jobs": grid.jobs, "teacher": teacher, "student_before": {str(k): v for k, v in before.items()},
        "runs": runs, "summary": summary, "failed": failed, "wall_s": wall_s, "commit": _git_commit(),
        "machine": _machine(),
    }


def format_markdown(res: dict) -> str:
    n_seeds = len(res["seeds"])
    lines = [f"| method | final held-out success (mean ± std over {n_seeds} seeds) | per seed | "
             "mean over eval points | final held-out reward | λ |", "|---|---|---|---|---|---|"]
    t = res.get("teacher")
    if t is not None:
        lines.append(f"| teacher | {t['success_rate']:.3f} ± {t['stderr']:.3f} (binomial s.e.) | — | — | "
                     f"{t['reward_mean']:.3f} | — |")
    for m, desc in res["methods"].items():
        if m == "teacher":
            continue
        s = res["summary"].get(m)
        if s is None:
            lines.append(f"| {m} | not finished | | | | {desc} |")
            continue
        per = ", ".join(f"{r['final']:.3f}" for r in res["runs"][m].values())
        f, a, r = s["final"], s["mean_over_steps"], s["final_reward"]
        lines.append(f"| {m} | {f['mean']:.3f} ± {f['std']:.3f} | {per} | {a['mean']:.3f} ± {a['std']:.3f} | "
                     f"{r['mean']:.3f} ± {r['std']:.3f} | {desc} |")
    env = res["env"] or {}
    mach = res["machine"]
    lines += ["", f"{env.get('name')} {env.get('kwargs')}; {res['max_steps']} steps × {res['episodes_per_step']} "
              f"episodes per run, held-out evaluation every {res['eval_every']} steps on {res['eval_episodes']} "
              f"episodes; seeds {res['seeds']}; overrides {res['overrides'] or 'none'}.",
              f"Wall time {_wall_text(res)} with {res['jobs']} run(s) at a time on {mach['cpu']} "
              f"({mach['cpu_count']} cores, GPU: {mach['gpu'] or 'none'}, torch {mach['torch']}); "
              f"report written at commit {res['commit']}."]
    if res["failed"]:
        lines.append(f"Failed runs: {res['failed']}")
    return "\n".join(lines) + "\n"


def _wall_text(res: dict) -> str:
    """Wall time per invocation that trained something (a resumed or re-reported grid has several)."""
    calls = res.get("invocations") or [{"wall_s": res["wall_s"], "commit": res["commit"], "runs_trained": None}]
    parts = [f"{c['wall_s'] / 60:.1f} min" + (f" ({c['runs_trained']} runs trained, commit {c['commit']})"
                                              if c.get("runs_trained") is not None else "")
             for c in calls if c.get("runs_trained") or len(calls) == 1]
    return " + ".join(parts) or "0 min (every run had finished before)"


def plot(res: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'atod-fast[viz]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    t = res.get("teacher")
    curves = [("curve", "success_rate", "held-out success rate", "success_vs_step.png")]
    if _reward_is_not_success(res):  # e.g. partial credit for a lost game: worth its own plot
        curves.append(("reward_curve", "reward_mean", "held-out reward (mean)", "reward_vs_step.png"))
    for key, teacher_key, ylabel, name in curves:
        paths.append(_curve_plot(plt, res, key, t[teacher_key] if t else None, ylabel, out / name, colors))

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [m for m in res["runs"] if res["runs"][m]]
    for i, m in enumerate(names):
        finals = [r["final"] for r in res["runs"][m].values()]
        ax.scatter([i] * len(finals), finals, color=colors[i % len(colors)], alpha=0.6, s=18)
        s = res["summary"][m]["final"]
        ax.errorbar([i + 0.15], [s["mean"]], yerr=[s["std"]], fmt="D", color="k", ms=4, capsize=3)
    if t is not None:
        ax.axhspan(t["success_rate"] - t["stderr"], t["success_rate"] + t["stderr"], color="k", alpha=0.1)
        ax.axhline(t["success_rate"], color="k", ls="--", lw=1.2, label="teacher (± s.e.)")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="final held-out success", title="final success: seeds (dots), mean ± std (diamond)")
    fig.tight_layout()
    paths.append(out / "final_success.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _reward_is_not_success(res: dict) -> bool:
    return any(abs(a[1] - b[1]) > 1e-9 for per in res["runs"].values() for r in per.values()
               for a, b in zip(r["curve"], r.get("reward_curve", r["curve"]), strict=True))


def _curve_plot(plt, res: dict, key: str, teacher: float | None, ylabel: str, path: Path, colors) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (m, per_seed) in enumerate(res["runs"].items()):
        if not per_seed:
            continue
        curves = [dict(r[key]) for r in per_seed.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ys = [[c[x] for c in curves] for x in steps]
        mean = [statistics.fmean(y) for y in ys]
        c = colors[i % len(colors)]
        ax.plot(steps, mean, color=c, lw=1.8, marker="o", ms=3, label=f"{m} (n={len(curves)})")
        ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=c, alpha=0.15, lw=0)
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1.2, label="teacher")
    ax.set(xlabel="training step", ylabel=ylabel,
           title=f"{(res['env'] or {}).get('name')}: mean over seeds, band = min..max")
    if key == "curve":
        ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, res: dict, *, log=print) -> list[Path]:
    """results.json, results.md and (with matplotlib) the two plots; returns the paths written."""
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(format_markdown(res))
    try:
        pngs = plot(res, out)
    except ImportError as e:  # the numbers are worth keeping without the plots
        log(f"no plots: {e}")
        pngs = []
    return [out / "results.json", out / "results.md", *pngs]
