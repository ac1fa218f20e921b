"""Benchmark compute_gae against the padded reverse loop that public trainers use.

B trajectories of variable length (uniform in [mean/2, 3·mean/2]), each with 4–10 turns of
alternating observation and action tokens (about half action tokens), a reward on the last
action token of every turn and a final score. Providers, side by side in one run:

  loop      reverse Python loop over time on the padded [B, T_max] batch, a few tensor ops per
            position, skipping observation tokens (the verl recipe; written here in plain torch);
            one thread, its fastest setting
  torch     compute_gae(backend="torch"), the vectorized pure-PyTorch fallback
  cpp-1t    compute_gae(backend="cpp") with 1 thread
  cpp-Nt    compute_gae(backend="cpp") with all threads
  triton    compute_gae(backend="triton") (CUDA only; the loop then runs on the GPU too)

Times are medians of end-to-end calls (validation and output allocation included), taken in
interleaved rounds (every provider once per round) so that background load hits them alike.
Bytes that must move per token: read r, V (4 B each), mask (1 B); write A, R (4 B each) =
17 B. The memcpy row copies the same number of bytes (17·T / 2 read + written) in the same
rounds, with one thread on the CPU (glibc memcpy).

    python benchmarks/bench_gae.py                     # CPU, mean lengths 1k, 8k, 32k
    python benchmarks/bench_gae.py --device cuda       # GPU (triton, torch, loop)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from atod_fast import compute_gae, turn_rewards_to_tokens

BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4


def make_batch(rng: np.random.Generator, batch: int, mean_len: int):
    """Packed (rewards, values, cu_seqlens, action_mask) as numpy arrays."""
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, size=batch)
    masks, turn_counts = [], []
    for n in lengths:
        turns = int(rng.integers(4, 11))
        cuts = np.sort(rng.choice(np.arange(1, n), size=2 * turns - 1, replace=False))
        seg = np.diff(np.concatenate([[0], cuts, [n]]))
        masks.append(np.repeat(np.arange(2 * turns) % 2 == 1, seg))   # observation first, then action
        turn_counts.append(turns)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    mask = np.concatenate(masks)
    turn_rewards = rng.standard_normal((batch, max(turn_counts))) * (
        np.arange(max(turn_counts))[None, :] < np.array(turn_counts)[:, None])
    rewards = turn_rewards_to_tokens(cu, mask, turn_rewards=turn_rewards,
                                     final_scores=rng.standard_normal(batch))
    values = rng.standard_normal(len(mask)).astype(np.float32)
    return rewards, values, cu, mask


def pad(x: torch.Tensor, cu: np.ndarray) -> torch.Tensor:
    """[T] packed -> [B, T_max] right-padded with zeros."""
    lengths = np.diff(cu)
    out = x.new_zeros(len(lengths), int(lengths.max()))
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.from_numpy(lengths))
    cols = torch.arange(int(cu[-1])) - torch.from_numpy(np.repeat(cu[:-1], lengths))
    out[rows.to(x.device), cols.to(x.device)] = x
    return out


def padded_loop_gae(rewards, values, mask, gamma: float, lam: float):
    """The usual baseline: one step per time position over [B, T_max], skipping observation tokens.

    Padding is masked out like an observation token, so it neither discounts nor bootstraps.
    """
    B, T = rewards.shape
    maskf = mask.to(rewards.dtype)
    next_value = rewards.new_zeros(B)
    last = rewards.new_zeros(B)
    adv = []
    for t in range(T - 1, -1, -1):
        m = maskf[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        cand = delta + gamma * lam * last
        last = m * cand + (1 - m) * last
        next_value = m * values[:, t] + (1 - m) * next_value
        adv.append(last)
    adv = torch.stack(adv[::-1], dim=1) * maskf
    return adv, (adv + values) * maskf


def bench_one(args, rng, mean_len: int) -> dict:
    """Time every provider on one batch, in interleaved rounds (fair under background load)."""
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    all_threads = torch.get_num_threads()
    r_np, v_np, cu_np, m_np = make_batch(rng, args.batch, mean_len)
    T = len(r_np)
    r, v, m = (torch.from_numpy(a).to(dev) for a in (r_np, v_np, m_np))
    cu = torch.from_numpy(cu_np).to(dev)
    rp, vp, mp = pad(r, cu_np), pad(v, cu_np), pad(m, cu_np)
    nbytes = BYTES_PER_TOKEN * T
    if dev == "cuda":
        src = torch.ones(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        memcpy = lambda: dst.copy_(src)  # noqa: E731
    else:  # glibc memcpy, one thread: the bandwidth one core gets
        src = np.ones(nbytes // 2, dtype=np.uint8)
        dst = np.empty_like(src)
        memcpy = lambda: np.copyto(dst, src)  # noqa: E731

    def gae(backend):
        return lambda: compute_gae(r, v, cu, m, backend=backend, gamma=args.gamma, lam=args.lam)

    # name -> (function, threads, returns advantages)
    providers = {"triton": (gae("triton"), None, True), "torch": (gae("torch"), None, True)} if dev == "cuda" else {
        "cpp-1t": (gae("cpp"), 1, True), "cpp-Nt": (gae("cpp"), all_threads, True),
        "torch": (gae("torch"), all_threads, True)}
    # one thread: its [B]-sized ops are too small for torch to split, and extra threads only add overhead
    providers["loop"] = (lambda: padded_loop_gae(rp, vp, mp, args.gamma, args.lam), 1, True)
    providers["memcpy"] = (memcpy, None, False)

    outs, times = {}, {name: [] for name in providers}
    for rnd in range(args.repeats + 1):            # round 0 warms up (and keeps the outputs)
        for name, (fn, threads, _) in providers.items():
            if name == "loop" and rnd >= args.loop_repeats:
                continue
            torch.set_num_threads(threads or all_threads)
            t0 = time.perf_counter()
            out = fn()
            sync()
            dt = time.perf_counter() - t0
            if rnd == 0:
                outs[name] = out
            if rnd > 0 or name == "loop":          # the loop is long enough to need no warm-up
                times[name].append(dt)
    torch.set_num_threads(all_threads)

    ref = outs[next(iter(providers))][0]
    row = dict(mean_len=mean_len, batch=args.batch, tokens=T, t_max=int(np.diff(cu_np).max()),
               action_fraction=float(m_np.mean()), providers={})
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row["memcpy_seconds"] = med["memcpy"]
    row["memcpy_bytes_per_s"] = nbytes / med["memcpy"]
    for name, (_, threads, has_out) in providers.items():
        if name == "memcpy":
            continue
        p = dict(seconds=med[name], min_seconds=min(times[name]), runs=len(times[name]), threads=threads,
                 tokens_per_s=T / med[name], bytes_per_s=nbytes / med[name],
                 speedup_vs_loop=med["loop"] / med[name], x_of_memcpy_time=med[name] / med["memcpy"])
        if has_out:
            a = outs[name][0]
            a = a[mp] if name == "loop" else a[m]   # action tokens, in packed order
            p["max_abs_diff_vs_first"] = float((a - ref[m]).abs().max())
        row["providers"][name] = p
    row["reference_scale"] = float(ref.abs().max())
    return row


def run(args) -> dict:
    rng = np.random.default_rng(0)
    results = []
    for mean_len in args.lengths:
        row = bench_one(args, rng, mean_len)
        print("\n".join(table_lines(row)), flush=True)
        results.append(row)
    return dict(
        benchmark="bench_gae", device=args.device, device_name=device_name(args.device),
        threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        gamma=args.gamma, lam=args.lam, repeats=args.repeats, loop_repeats=args.loop_repeats,
        load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None, results=results,
    )


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


HEADER = f"| {'mean len':>8} | {'tokens':>9} | {'provider':<8} | {'median ms':>10} | {'min ms':>9} | " \
         f"{'Mtok/s':>8} | {'GB/s':>6} | {'vs loop':>8} | {'× memcpy':>8} |"


def table_lines(row) -> list[str]:
    head = f"| {row['mean_len']:>8} | {row['tokens']:>9} | "
    lines = []
    for name, p in row["providers"].items():
        lines.append(head + f"{name:<8} | {p['seconds'] * 1e3:>10.2f} | {p['min_seconds'] * 1e3:>9.2f} | "
                     f"{p['tokens_per_s'] / 1e6:>8.1f} | {p['bytes_per_s'] / 1e9:>6.2f} | "
                     f"{p['speedup_vs_loop']:>7.1f}× | {p['x_of_memcpy_time']:>7.2f}× |")
    lines.append(head + f"{'memcpy':<8} | {row['memcpy_seconds'] * 1e3:>10.2f} | {'':>9} | {'':>8} | "
                 f"{row['memcpy_bytes_per_s'] / 1e9:>6.2f} | {'':>8} | {1.0:>7.2f}× |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the (slow) padded loop")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_gae_<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a GPU")
    print(HEADER)
    print("|" + "|".join("-" * (len(c)) for c in HEADER.split("|")[1:-1]) + "|")
    report = run(args)
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_gae_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# bench_gae on {report['device_name']}", "",
          f"torch {report['torch']}, {report['threads']} threads, B = {args.batch}, γ = {args.gamma}, "
          f"λ = {args.lam}, median of {args.repeats} interleaved rounds (loop: {args.loop_repeats}); "
          f"load average after the run: {report['load_average_after']}", "", HEADER,
          "|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|"]
    for row in report["results"]:
        md += table_lines(row)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"saved {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
