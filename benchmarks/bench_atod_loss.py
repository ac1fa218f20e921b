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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from atod_fast import atod_loss
from atod_fast.ops.losses.api import BACKENDS, triton_available

GPU_SHAPES = [  # (N, H, Ht, V)
    (1024, 4096, 4096, 128256), (2048, 4096, 4096, 128256), (4096, 4096, 4096, 128256),  # Liger's JSD shapes
    (8192, 4096, 4096, 128256),
    (8192, 2304, 2304, 256000),  # Cut Cross-Entropy's
    (8192, 896, 3584, 151936),  # Qwen2.5-0.5B student, 7B teacher
]
CPU_SHAPES = [(2048, 256, 256, 32768)]
MODES = ("forward", "backward", "full")
PROVIDERS = ("matmul", "reference", "reference_compile", "torch", "triton", "triton_fused", "liger", "liger_jsd")
CONFIGS = {
    # Distillation only (λ ≡ 1, JSD β = 0.5): what Liger's JSD losses compute.
    "distill": dict(divergence="jsd", jsd_beta=0.5),
    # The full ATOD loss, one pass: λ = 0.5 mix of JSD (β = 0.5) and clipped PPO + k3 KL (Liger: two passes).
    "atod": dict(divergence="jsd", jsd_beta=0.5, kl_coef=0.05),
    # The ATOD step with per-token λ and reverse KL (no Liger counterpart).
    "atod_rkl": dict(divergence="reverse_kl", kl_coef=0.05),
}
LAM = {"distill": 1.0, "atod": 0.5}  # constant λ of a config; per-token random λ otherwise


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
        lam=(torch.full((n,), LAM[config]) if config in LAM else torch.rand(n, generator=g)).to(device),
        loss_mask=torch.ones(n, dtype=torch.bool, device=device),
        teacher_hidden=rnd(n, ht), teacher_weight=rnd(v, ht, scale=ht**-0.5),
    )
    if config != "distill":
        kw["ref_logprobs"] = kw["old_logprobs"] + 0.1 * torch.randn(n, generator=g).to(device)
    return kw


class _MatmulStep:
    """The bare matmuls of the same work, unchunked: the forward's logits, the backward's two products."""

    def __init__(self, kw):
        self.kw = kw
        h, w = kw["student_hidden"].detach(), kw["student_weight"].detach()
        self.z = h @ w.t()
        if kw.get("teacher_hidden") is not None:
            self.zt = kw["teacher_hidden"] @ kw["teacher_weight"].t()

    def backward(self):
        h, w = self.kw["student_hidden"].detach(), self.kw["student_weight"].detach()
        self.gh = self.z @ w
        self.gw = self.z.t() @ h

    def item(self):
        return float("nan")


def _liger(kw, config, device):
    """Liger-Kernel's chunked losses (plain PyTorch under torch.compile; CPU and CUDA)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss
    except ImportError:
        return "liger-kernel not installed"
    hp = CONFIGS[config]
    if hp["divergence"] != "jsd" or config not in LAM:
        return "no Liger counterpart"
    compiled = os.environ.get("ATOD_FAST_COMPILE", "1") != "0"  # the dry run skips compiling Liger's chunks
    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=hp["jsd_beta"], compiled=compiled)
    h, w, th, tw, tgt = (kw[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                         "target_ids"))
    if config == "distill":
        return lambda: jsd(h, w, th, tw, tgt)
    # GRPO takes [B, T] sequences with one advantage each: the N tokens as 16 sequences.
    grpo = LigerFusedLinearGRPOLoss(beta=hp["kl_coef"], loss_type="grpo", compiled=compiled)
    b = 16
    t = h.shape[0] // b
    mask = torch.ones(b, t, device=device)
    adv = kw["advantages"][:b]
    old, ref = kw["old_logprobs"].view(b, t), kw["ref_logprobs"].view(b, t)
    lam = LAM[config]

    def both():
        pg = grpo(h.view(b, t, -1), w, tgt.view(b, t), mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        pg = pg[0] if isinstance(pg, tuple) else pg
        return lam * jsd(h, w, th, tw, tgt) + (1 - lam) * pg

    return both


def provider_fn(name, kw, config, device):
    """A zero-argument callable returning a differentiable scalar loss, or a string saying why not."""
    hp = CONFIGS[config]
    if name == "matmul":
        return lambda: _MatmulStep(kw)
    if name == "liger":
        return _liger(kw, config, device)
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
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU: Triton runs only through its interpreter here, which is a correctness tool, not timed"
    if name == "reference_compile":
        compiled = torch.compile(lambda: atod_loss(**kw, backend="reference", **hp).loss)
        return compiled
    return lambda: atod_loss(**kw, backend=name, **hp).loss


def _step(fn, params, device):
    """One forward then one backward, timed apart (synchronized in between). -> (fwd s, bwd s, loss)"""
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
    return t1 - t0, t2 - t1, float(loss.item())


def measure(fns, kw, device, reps, warmup, peaks=None):
    """{provider: {mode: (median ms, peak extra bytes), "first_s": s, "loss": value} or {"error": why}}.

    Providers are timed in interleaved rounds (the order rotates every round), so a noisy host slows
    them alike and the ratios of medians from one run hold. Peak memory is measured per provider
    outside the timed rounds: the forward's on a forward whose graph stays alive, the step's on one step;
    ``peaks`` ({provider: [forward peak, step peak]}) gives them from elsewhere instead (the CPU's memory
    pass, see :func:`cpu_peaks`). ``reps=0`` measures memory alone.
    """
    params = [kw["student_hidden"], kw["student_weight"]]
    res, live = {}, {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            _, _, loss = _step(fn, params, device)
            res[name] = {"first_s": time.perf_counter() - t0, "loss": loss}
            for _ in range(warmup - 1):
                _step(fn, params, device)
            if peaks is None:
                with PeakMemory(device) as fwd_mem:
                    out = fn()
                    sync(device)
                del out
                with PeakMemory(device) as mem:
                    _step(fn, params, device)
                res[name].update(fwd_peak=fwd_mem.peak, peak=mem.peak)
            else:
                res[name].update(fwd_peak=peaks[name][0], peak=peaks[name][1])
            live[name] = fn
        except Exception as e:  # one provider failing (OOM, compile error) must not end the run
            oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e)
            res[name] = {"error": "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if reps == 0:
        return res
    times = {name: [] for name in live}
    names = list(live)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)] if names else []:
            times[name].append(_step(live[name], params, device)[:2])
    for p in params:
        p.grad = None
    for name, ts in times.items():
        fwd, bwd = (statistics.median(t) * 1e3 for t in zip(*ts, strict=True))
        full = statistics.median(a + b for a, b in ts) * 1e3
        r = res[name]
        r.update(forward=(fwd, r["fwd_peak"]), backward=(bwd, r["peak"]), full=(full, r["peak"]))
    return res


def _rows_of(key, r, modes, flops, mm_bf16, mm_dtype, base_ms, ref_peak):
    """Result rows of one provider (one per mode), printed as they are made."""
    shape = f"{key['N']}x{key['H']}x{key['Ht']}x{key['V']} {key['config']:8s} {key['provider']:18s}"
    if "error" in r:
        print(f"{shape} failed: {r['error']}")
        return [dict(key, error=r["error"])]
    rows = []
    for mode in modes:
        ms, peak = r[mode]
        row = dict(key, mode=mode, median_ms=round(ms, 3), peak_mib=None if peak is None else round(peak / 2**20, 1))
        if mode == "full":
            row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 4)
            row["pct_bf16_matmul"] = round(100 * row["tflops"] / mm_bf16, 2)
            row["pct_input_dtype_matmul"] = round(100 * row["tflops"] / mm_dtype, 2)
            row["x_matmul"] = round(ms / base_ms, 3) if base_ms else None
            row["pct_reference_peak"] = round(100 * peak / ref_peak, 1) if ref_peak and peak is not None else None
            row["first_call_s"] = round(r["first_s"], 2)
            row["loss"] = r["loss"]
        rows.append(row)
        print(f"{shape} {mode:8s} {ms:10.2f} ms {row['peak_mib']} MiB"
              + (f" x{row['x_matmul'] or 0:.2f} of matmul, {row['pct_bf16_matmul']:.1f}% of bf16 mm, "
                 f"loss {r['loss']:.6g}, first call {r['first_s']:.1f} s" if mode == "full" else ""))
    return rows


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), no GPU"


def _versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__
            from importlib.metadata import PackageNotFoundError, version
            try:
                out[mod] = version(mod.replace("_", "-"))
            except PackageNotFoundError:
                out[mod] = None
    return out


def device_slug(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_peaks(argv) -> dict | None:
    """Peak memory of every (shape, config, provider) on the CPU, from a run of this script in a child process.

    Peak RSS shows an allocation only if freed memory goes back to the OS, so the child has glibc serve every
    allocation of 64 KiB or more with its own mmap (a fixed threshold). That costs a page fault per fresh page,
    which no process pays in normal use: the times come from this process, under the default allocator.
    -> {"N,H,Ht,V,config": {provider: [forward peak, step peak]}}; None on CUDA or off Linux (measured in place).
    """
    if torch.cuda.is_available() or sys.platform != "linux":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peaks.json"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run([sys.executable, __file__, *argv, "--memory-only", str(path)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(path.read_text())


def main(argv=None):
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks at validation are expected
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 10 GPU, 5 CPU)")
    ap.add_argument("--shapes", default=None, help="N,H,Ht,V;N,H,Ht,V;... (default: by device)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of an existing results file that this run did not measure (split long GPU runs)")
    ap.add_argument("--memory-only", type=Path, default=None, help=argparse.SUPPRESS)  # cpu_peaks' child
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (10 if gpu else 5)
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else GPU_SHAPES if gpu else CPU_SHAPES)
    if args.memory_only is not None:
        peaks = {}
        for n, h, ht, v in shapes:
            for config in args.configs.split(","):
                kw = make_inputs(n, h, ht, v, dtype, device, config)
                fns = {p: f for p in args.providers.split(",")
                       if not isinstance(f := provider_fn(p, kw, config, device), str)}
                res = measure(fns, kw, device, 0, warmup=1)
                peaks[f"{n},{h},{ht},{v},{config}"] = {p: [r["fwd_peak"], r["peak"]]
                                                       for p, r in res.items() if "peak" in r}
        args.memory_only.write_text(json.dumps(peaks))
        return
    peaks = cpu_peaks(argv) if not gpu else None
    mm_bf16 = matmul_tflops(device, torch.bfloat16, 8192 if gpu else 512, reps=10 if gpu else 3)
    mm_dtype = mm_bf16 if dtype == torch.bfloat16 else matmul_tflops(device, dtype, 1024, reps=3)
    print(f"device {device_slug(device)}, inputs {dtype}; measured matmul: bf16 {mm_bf16:.3f} TFLOP/s"
          + ("" if gpu else f", {dtype} {mm_dtype:.3f} TFLOP/s"))

    rows, notes = [], {}
    for n, h, ht, v in shapes:
        flops = 6 * n * h * v + 2 * n * ht * v
        for config in args.configs.split(","):
            kw = make_inputs(n, h, ht, v, dtype, device, config)
            fns = {}
            for prov in args.providers.split(","):
                fn = provider_fn(prov, kw, config, device)
                if isinstance(fn, str):
                    notes[(prov, config)] = fn
                else:
                    fns[prov] = fn
            mem = None if peaks is None else peaks.get(f"{n},{h},{ht},{v},{config}", {})
            res = measure(fns, kw, device, reps, warmup=1,
                          peaks=None if mem is None else {p: mem.get(p, [None, None]) for p in fns})
            base = res.get("matmul", {}).get("full", (None,))[0]
            ref_peak = res.get("reference", {}).get("peak")
            for prov, r in res.items():
                rows += _rows_of(dict(N=n, H=h, Ht=ht, V=v, config=config, provider=prov), r, args.modes.split(","),
                                 flops, mm_bf16, mm_dtype, base, ref_peak)
            del kw, fns
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
    meta = dict(device=slug, machine=_machine(device), threads=torch.get_num_threads(), versions=_versions(),
                torch=torch.__version__, dtype=str(dtype), reps=reps, matmul_bf16_tflops=mm_bf16,
                matmul_input_dtype_tflops=mm_dtype,
                memory="CUDA max_memory_allocated" if gpu else
                "peak RSS above the RSS before the call (VmHWM reset), measured in a separate process with "
                "MALLOC_MMAP_THRESHOLD_=65536; times under the default allocator",
                host_load_at_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
                skipped={f"{p}/{c}": why for (p, c), why in notes.items()})
    path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    lines = [f"# atod_loss benchmark on {slug} ({dtype}, median of {reps})", "",
             f"Machine: {meta['machine']}; {meta['threads']} threads; versions {meta['versions']}.", "",
             f"Measured matmul: bf16 {mm_bf16:.3f} TFLOP/s, {dtype} {mm_dtype:.3f} TFLOP/s. "
             "FLOPs counted: 6·N·H·V + 2·N·Ht·V. Peak memory: " + meta["memory"] + ". "
             f"Host load average at the end: {meta['host_load_at_end']}.", "",
             "Timed in interleaved rounds (provider order rotated each round); ratios are of medians from this run.",
             "", "| N×H×Ht×V | config | provider | mode | median ms | × matmul | peak MiB | % of reference peak | "
             "TFLOP/s | % bf16 mm | % input-dtype mm | loss | first call s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['N']}×{r['H']}×{r['Ht']}×{r['V']}"
        lines.append(f"| {shape} | {r['config']} | {r['provider']} | {r.get('mode', '')} | "
                     + (f"{r['error']} | | | | | | | | |" if r.get("error") else
                        " | ".join(str(r.get(k, "")) for k in (
                            "median_ms", "x_matmul", "peak_mib", "pct_reference_peak", "tflops", "pct_bf16_matmul",
                            "pct_input_dtype_matmul", "loss", "first_call_s")) + " |"))
    lines += ["", *[f"- skipped {p} ({c}): {why}" for (p, c), why in sorted(notes.items())]]
    (out / f"atod_loss_{slug}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/atod_loss_{slug}.json and .md")


if __name__ == "__main__":
    main()
