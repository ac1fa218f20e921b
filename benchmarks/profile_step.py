"""Profile training steps: where a step's time goes, phase by phase, and the top ops.

Runs ``--warmup`` trainer steps, then ``--steps`` steps under ``torch.profiler``, and writes to
``--out``:

- ``trace.json``: a Chrome trace (chrome://tracing, Perfetto) with one range per phase;
- ``phases.json`` / ``phases.md``: seconds per phase (median and total over the profiled steps)
  and the top 20 ops by self time.

Phases: ``rollout`` (the student plays the step's episodes), ``batch`` (packing the episodes),
``student pass`` (behaviour log-probs and values), ``teacher scoring`` (teacher and reference),
``advantages``, ``update`` (PPO epochs × minibatches).

The config is ``atod-fast train``'s: its defaults (the built-in tiny student and teacher), a
``--config`` file and ``key.sub=value`` overrides. ``--preset qwen2.5-0.5b-7b`` swaps in
random-init models shaped like Qwen2.5-0.5B (student) and Qwen2.5-7B (teacher), built in
process over the built-in tokenizer (nothing is downloaded); ``--dry-run`` shrinks a preset (and
the run) to tiny shapes on the CPU, to check the same code path in seconds.

    python benchmarks/profile_step.py --out DIR
    python benchmarks/profile_step.py --device cuda --preset qwen2.5-0.5b-7b --out DIR
    python benchmarks/profile_step.py --dry-run --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("rollout", "batch", "student pass", "teacher scoring", "advantages", "update")

# Shapes of the Qwen2.5 checkpoints' config.json (hidden, layers, heads, kv heads, MLP, vocab, tied head).
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
PRESETS = {"qwen2.5-0.5b-7b": ("qwen2.5-0.5b", "qwen2.5-7b")}
# --dry-run: the preset's code path at tiny shapes (head sizes still differ, as Qwen's do).
TINY_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=384, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=256, vocab_size=448, tie_word_embeddings=False),
}
DRY_RUN = ["max_steps=4", "rollout.episodes_per_step=4", "rollout.max_new_tokens=4", "rollout.max_episode_tokens=96",
           "sft.steps=5", "sft.episodes=16", "sft.batch_size=4", "sft.arch.hidden_size=32",
           "sft.arch.intermediate_size=64", "sft.arch.num_heads=2", "model.student_arch.hidden_size=32",
           "model.student_arch.intermediate_size=64", "model.student_arch.num_heads=2"]


def qwen_lm(shape: dict, tokenizer, *, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-init ``Qwen2ForCausalLM`` of ``shape``, built directly on ``device`` in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1_000_000.0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialized in the weights' dtype: a 7B model never exists in fp32 too
    try:
        with torch.device(device):
            lm = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    return lm


@contextlib.contextmanager
def preset_models(name: str, *, tiny: bool, dtype: str):
    """Replaces the trainer's model loading by the preset's random-init student and teacher."""
    from atod_fast.trainer import loading, loop
    from atod_fast.trainer.models import Policy, build_tokenizer, freeze

    student_shape, teacher_shape = ((TINY_SHAPES if tiny else QWEN_SHAPES)[k] for k in PRESETS[name])
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def load_models(cfg, teacher_path, *, device, world, resume_from):
        from atod_fast.trainer.sft import expert_episodes

        demos = expert_episodes(cfg.env, 64, 0.0, cfg.seed)
        tok = build_tokenizer([t for first, turns in demos for t in [first, *[x for a, o, _ in turns for x in (a, o)]]],
                              cfg.sft.vocab_size)
        # As many tokens as the student's head has rows: a random-init student samples from all of them.
        tok.add_tokens([f"<|pad{i}|>" for i in range(student_shape["vocab_size"] - len(tok))])
        lm = qwen_lm(student_shape, tok, device=device, dtype=torch_dtype, seed=cfg.seed)
        teacher = freeze(qwen_lm(teacher_shape, tok, device=device, dtype=torch_dtype, seed=cfg.seed + 1))
        reference = freeze(qwen_lm(student_shape, tok, device=device, dtype=torch_dtype, seed=cfg.seed)) \
            if cfg.loss.kl_coef > 0 else None
        policy = Policy(lm).to(device=device, dtype=torch_dtype).train()
        return loading.Models(policy, tok, teacher, reference)

    saved = loop.load_models, loop.teacher_location
    loop.load_models, loop.teacher_location = load_models, lambda cfg, progress: "preset"
    try:
        yield
    finally:
        loop.load_models, loop.teacher_location = saved


class _Timed:
    """Wraps a callable: its calls are timed into ``times[phase]`` and marked as a range in the trace."""

    def __init__(self, fn, phase: str, times: dict, sync):
        self.fn, self.phase, self.times, self.sync = fn, phase, times, sync

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *a, **kw):
        self.sync()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"phase: {self.phase}"):
            out = self.fn(*a, **kw)
        self.sync()
        self.times[self.phase] = self.times.get(self.phase, 0.0) + time.perf_counter() - t0
        return out


def instrument(trainer, times: dict) -> None:
    """Times the trainer's parts in place (each step's phases add up into ``times``)."""
    from atod_fast.trainer import loop

    cuda = trainer.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(trainer.device)

    trainer.rollout = _Timed(trainer.rollout, "rollout", times, sync)
    trainer.learner.behaviour = _Timed(trainer.learner.behaviour, "student pass", times, sync)
    trainer.learner.update = _Timed(trainer.learner.update, "update", times, sync)
    trainer.advantages = _Timed(trainer.advantages, "advantages", times, sync)
    for name in ("teacher", "reference"):
        scorer = getattr(trainer, name)
        if scorer is not None:
            scorer.score = _Timed(scorer.score, "teacher scoring", times, sync)
    build = loop.StepBatch.build
    loop.StepBatch = type("StepBatch", (loop.StepBatch,), {})  # a subclass: the timing stays in this process
    loop.StepBatch.build = classmethod(lambda cls, trajs, device: _Timed(build, "batch", times, sync)(trajs, device))


def build_trainer(args):
    from atod_fast.trainer.config import load_train_config
    from atod_fast.trainer.loop import Trainer

    overrides = [*(DRY_RUN if args.dry_run else []), f"device={args.device}", f"output_dir={args.out / 'run'}",
                 "logging.progress=false", "logging.tensorboard=false", *args.overrides]
    cfg = load_train_config(args.config, overrides)
    trainer = Trainer(cfg)
    with preset_models(args.preset, tiny=args.dry_run, dtype=cfg.model.dtype) if args.preset \
            else contextlib.nullcontext():
        trainer.setup(progress=False)
    return trainer


def top_ops(prof, n: int = 20) -> list[dict]:
    cuda = any(getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA for e in prof.key_averages())
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("phase: "):
            continue
        rows.append({"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "cpu_total_s": e.cpu_time_total / 1e6,
                     **({"self_device_s": getattr(e, "self_device_time_total", 0) / 1e6} if cuda else {})})
    key = "self_device_s" if cuda else "self_cpu_s"
    return sorted(rows, key=lambda r: -r[key])[:n]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), no GPU"


def run(args) -> dict:
    from atod_fast.trainer.loop import Trainer  # noqa: F401  (imported before instrument patches loop)

    args.out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(args)
    per_step: list[dict] = []
    for k in range(args.warmup):
        trainer.step(k + 1)
    instrument(trainer, times := {})
    sync = (lambda: torch.cuda.synchronize(trainer.device)) if trainer.device.type == "cuda" else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for k in range(args.steps):
            times.clear()
            sync()
            t0 = time.perf_counter()
            trainer.step(args.warmup + k + 1)
            sync()
            step_s = time.perf_counter() - t0
            per_step.append({"step": step_s, **{p: times.get(p, 0.0) for p in PHASES},
                             "other": step_s - sum(times.values())})
    prof.export_chrome_trace(str(args.out / "trace.json"))
    names = [*PHASES, "other", "step"]
    return {
        "machine": machine(trainer.device), "device": str(trainer.device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "preset": args.preset, "dry_run": args.dry_run,
        "warmup_steps": args.warmup, "profiled_steps": args.steps,
        "phases_median_s": {p: statistics.median(s[p] for s in per_step) for p in names},
        "phases_total_s": {p: sum(s[p] for s in per_step) for p in names},
        "per_step_s": per_step, "top_ops": top_ops(prof),
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(sys.argv[0]).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(res: dict) -> str:
    lines = [f"# profile_step: {res['machine']}", "",
             f"`{res['command']}` at commit {res['commit']}, {res['date']}; torch {res['torch']}, "
             f"{res['threads']} thread(s); {res['warmup_steps']} warm-up step(s), {res['profiled_steps']} profiled "
             "(under the profiler, which adds its own overhead).", "",
             "| phase | median s/step | total s | share |", "|---|---|---|---|"]
    total = res["phases_total_s"]["step"] or 1.0
    for p in [*PHASES, "other", "step"]:
        lines.append(f"| {p} | {res['phases_median_s'][p]:.4f} | {res['phases_total_s'][p]:.3f} | "
                     f"{100 * res['phases_total_s'][p] / total:.1f}% |")
    dev = "self_device_s" if res["top_ops"] and "self_device_s" in res["top_ops"][0] else None
    lines += ["", "Top 20 ops by self " + ("device" if dev else "CPU") + " time:", "",
              "| op | calls | self CPU s | CPU total s |" + (" self device s |" if dev else ""),
              "|---|---|---|---|" + ("---|" if dev else "")]
    for r in res["top_ops"]:
        lines.append(f"| `{r['op']}` | {r['calls']} | {r['self_cpu_s']:.4f} | {r['cpu_total_s']:.4f} |"
                     + (f" {r[dev]:.4f} |" if dev else ""))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="steps run before profiling (default: 2)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    p.add_argument("--config", default=None, help="a train YAML file (default: atod-fast train's defaults)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="random-init student/teacher shaped like these checkpoints (no download)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes and a tiny run on the CPU: checks the code path in seconds")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="train config overrides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.dry_run:
        args.device, args.steps, args.warmup = "cpu", min(args.steps, 2), min(args.warmup, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.out is None:
            args.out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.dry_run:  # a private cache: the tiny built-in teacher is not the default run's
            os.environ.setdefault("ATOD_FAST_CACHE", str(args.out / "cache"))
        res = run(args)
        (args.out / "phases.json").write_text(json.dumps(res, indent=2))
        (args.out / "phases.md").write_text(md := markdown(res))
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
