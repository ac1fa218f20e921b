"""Benchmark of the ATOD loss: every provider side by side, modes forward / backward / full.

    python benchmarks/bench_atod_loss.py            # GPU: the public anchor shapes in bf16; CPU: a small set in fp32

Providers: the reference (eager and under torch.compile), the chunked torch and triton backends,
triton_fused, and Liger-Kernel's LigerFusedLinearJSD when installed (an external anchor: it only
does distillation, so it runs the distillation-only configuration). Reported per (shape, config,
provider, mode): median milliseconds, peak extra memory, and for ``full`` the effective rate
(6·N·H·V + 2·N·Ht·V) / time and that rate as a share of the bf16 matmul rate measured in the same run.
Results: a printed table, plus JSON and markdown under benchmarks/results/ named by device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from atod_fast import atod_loss
from atod_fast.ops.losses.api import BACKENDS, triton_available

GPU_SHAPES = [  # (N, H, Ht, V)
    (4096, 4096, 4096, 128256), (8192, 4096, 4096, 128256), (16384, 4096, 4096, 128256),  # Liger's
    (8192, 2304, 2304, 256000),  # Cut Cross-Entropy's
    (8192, 896, 3584, 151936),  # Qwen2.5-0.5B student, 7B teacher
]
CPU_SHAPES = [(256, 256, 256, 8192), (768, 64, 128, 32768)]
MODES = ("forward", "backward", "full")
PROVIDERS = ("reference", "reference_compile", "torch", "triton", "triton_fused", "liger_jsd")
CONFIGS = {
    # The ATOD step: λ-mixed reverse KL + clipped PPO + k3 KL, dense teacher.
    "atod": dict(divergence="reverse_kl", kl_coef=0.05, entropy_coef=0.0),
    # Distillation only (λ ≡ 1, JSD β = 0.5): the configuration Liger's kernel computes.
    "distill": dict(divergence="jsd", jsd_beta=0.5),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator stats, or peak RSS on the CPU (Linux)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
            except OSError:
                pass
            self.base = rss("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = max(0, rss("VmHWM:") - self.base)


def matmul_tflops(device, dtype, size, reps=10):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e12


def make_inputs(n, h, ht, v, dtype, device, config, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    kw = dict(
        student_hidden=rnd(n, h).requires_grad_(), student_weight=rnd(v, h, scale=h**-0.5).requires_grad_(),
        target_ids=torch.randint(0, v, (n,), generator=g).to(device),
        old_logprobs=torch.full((n,), -float(torch.tensor(float(v)).log()), device=device),
        advantages=torch.randn(n, generator=g).to(device),
        lam=(torch.rand(n, generator=g) if config == "atod" else torch.ones(n)).to(device),
        loss_mask=torch.ones(n, dtype=torch.bool, device=device),
        teacher_hidden=rnd(n, ht), teacher_weight=rnd(v, ht, scale=ht**-0.5),
    )
    if config == "atod":
        kw["ref_logprobs"] = kw["old_logprobs"] + 0.1 * torch.randn(n, generator=g).to(device)
    return kw


def provider_fn(name, kw, config, device):
    """A zero-argument callable returning a differentiable scalar loss, or a string saying why not."""
    hp = CONFIGS[config]
    if name == "liger_jsd":
        if config != "distill":
            return "distillation only"
        if device.type != "cuda":
            return "CUDA only"
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            return "liger-kernel not installed"
        jsd = LigerFusedLinearJSD(jsd_beta=hp["jsd_beta"])
        return lambda: jsd(kw["student_hidden"], kw["student_weight"], kw["teacher_hidden"], kw["teacher_weight"])
    if name.startswith("triton"):
        if name not in BACKENDS:
            return "backend not available in this build"
        if not triton_available():
            return "triton not installed"
        if device.type != "cuda":
            return "CPU: Triton runs only through its interpreter here, which is a correctness tool, not timed"
    if name == "reference_compile":
        compiled = torch.compile(lambda: atod_loss(**kw, backend="reference", **hp).loss)
        return compiled
    return lambda: atod_loss(**kw, backend=name, **hp).loss


def measure(fn, kw, device, reps, warmup):
    """{mode: (median ms, peak extra bytes)}. Each timed step is one forward then one backward, timed
    apart (synchronized in between), so full = forward + backward of the same iterations. The forward's
    peak is measured on a separate forward whose graph stays alive to the end of the measurement."""
    params = [kw["student_hidden"], kw["student_weight"]]

    def step():
        for p in params:
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = fn()
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, t2 - t0

    for _ in range(warmup):
        step()
    for p in params:
        p.grad = None
    with PeakMemory(device) as fwd_mem:
        loss = fn()
        sync(device)
    del loss
    with PeakMemory(device) as mem:
        times = [step() for _ in range(reps)]
    for p in params:
        p.grad = None
    med = [statistics.median(t) * 1e3 for t in zip(*times, strict=True)]
    return {"forward": (med[0], fwd_mem.peak), "backward": (med[1], mem.peak), "full": (med[2], mem.peak)}


def device_slug(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _reexec_for_honest_rss():
    """On the CPU, peak RSS shows an allocation only if freed memory goes back to the OS: make glibc
    serve every allocation of 64 KiB or more with its own mmap (fixed threshold) before torch starts."""
    if torch.cuda.is_available() or os.environ.get("MALLOC_MMAP_THRESHOLD_") or sys.platform != "linux":
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv=None):
    _reexec_for_honest_rss()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks at validation are expected
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    ap.add_argument("--shapes", default=None, help="N,H,Ht,V;N,H,Ht,V;... (default: by device)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of an existing results file that this run did not measure (split long GPU runs)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (10 if gpu else 3)
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else GPU_SHAPES if gpu else CPU_SHAPES)
    mm_bf16 = matmul_tflops(device, torch.bfloat16, 8192 if gpu else 1024, reps=10 if gpu else 3)
    mm_dtype = mm_bf16 if dtype == torch.bfloat16 else matmul_tflops(device, dtype, 1024, reps=3)
    print(f"device {device_slug(device)}, inputs {dtype}; measured matmul: bf16 {mm_bf16:.3f} TFLOP/s"
          + ("" if gpu else f", {dtype} {mm_dtype:.3f} TFLOP/s"))

    rows, notes = [], {}
    for n, h, ht, v in shapes:
        flops = 6 * n * h * v + 2 * n * ht * v
        for config in args.configs.split(","):
            kw = make_inputs(n, h, ht, v, dtype, device, config)
            for prov in args.providers.split(","):
                fn = provider_fn(prov, kw, config, device)
                if isinstance(fn, str):
                    notes[(prov, config)] = fn
                    continue
                try:
                    res = measure(fn, kw, device, reps, warmup=1)
                except Exception as e:  # one provider failing (OOM, compile error) must not end the run
                    oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e)
                    why = "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    rows.append(dict(N=n, H=h, Ht=ht, V=v, config=config, provider=prov, error=why))
                    print(f"{n}x{h}x{ht}x{v} {config:8s} {prov:18s} failed: {why}")
                    kw["student_hidden"].grad = kw["student_weight"].grad = None
                    if gpu:
                        torch.cuda.empty_cache()
                    continue
                for mode in args.modes.split(","):
                    ms, peak = res[mode]
                    row = dict(N=n, H=h, Ht=ht, V=v, config=config, provider=prov, mode=mode,
                               median_ms=round(ms, 3), peak_mib=round(peak / 2**20, 1))
                    if mode == "full":
                        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 4)
                        row["pct_bf16_matmul"] = round(100 * row["tflops"] / mm_bf16, 2)
                        row["pct_input_dtype_matmul"] = round(100 * row["tflops"] / mm_dtype, 2)
                    rows.append(row)
                    print(f"{n}x{h}x{ht}x{v} {config:8s} {prov:18s} {mode:8s} {ms:10.2f} ms {peak / 2**20:9.1f} MiB"
                          + (f" {row['tflops']:8.3f} TFLOP/s ({row['pct_bf16_matmul']:.1f}% of bf16 mm, "
                             f"{row['pct_input_dtype_matmul']:.1f}% of {dtype} mm)" if mode == "full" else ""))
            del kw
    for (prov, config), why in sorted(notes.items()):
        print(f"skipped {prov} ({config}): {why}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    path = out / f"atod_loss_{slug}.json"
    if args.merge and path.exists():
        key = lambda r: (r["N"], r["H"], r["Ht"], r["V"], r["config"], r["provider"], r.get("mode"))  # noqa: E731
        done = {key(r) for r in rows}
        rows = [r for r in json.loads(path.read_text())["results"] if key(r) not in done] + rows
    meta = dict(device=slug, torch=torch.__version__, dtype=str(dtype), reps=reps, matmul_bf16_tflops=mm_bf16,
                matmul_input_dtype_tflops=mm_dtype,
                memory="CUDA max_memory_allocated" if gpu else
                "peak RSS above the RSS at the start of the timed reps (VmHWM reset), MALLOC_MMAP_THRESHOLD_=65536",
                host_load_at_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
                skipped={f"{p}/{c}": why for (p, c), why in notes.items()})
    path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    lines = [f"# atod_loss benchmark on {slug} ({dtype}, median of {reps})", "",
             f"Measured matmul: bf16 {mm_bf16:.3f} TFLOP/s, {dtype} {mm_dtype:.3f} TFLOP/s. "
             "FLOPs counted: 6·N·H·V + 2·N·Ht·V. Peak memory: " + meta["memory"] + ". "
             f"Host load average at the end: {meta['host_load_at_end']}.", "",
             "| N×H×Ht×V | config | provider | mode | median ms | peak MiB | TFLOP/s | % bf16 mm | % input-dtype mm |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['N']}×{r['H']}×{r['Ht']}×{r['V']}"
        lines.append(f"| {shape} | {r['config']} | {r['provider']} | {r.get('mode', '')} | "
                     + (f"{r['error']} | | | | |" if r.get("error") else
                        f"{r['median_ms']} | {r['peak_mib']} | {r.get('tflops', '')} | "
                        f"{r.get('pct_bf16_matmul', '')} | {r.get('pct_input_dtype_matmul', '')} |"))
    lines += ["", *[f"- skipped {p} ({c}): {why}" for (p, c), why in sorted(notes.items())]]
    (out / f"atod_loss_{slug}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/atod_loss_{slug}.json and .md")


if __name__ == "__main__":
    main()
