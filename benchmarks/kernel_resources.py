"""GPU compile check without a GPU: every Triton kernel, compiled for sm_90 and sm_80, and its resources.

    python benchmarks/kernel_resources.py            # representative variants (CI)
    python benchmarks/kernel_resources.py --all      # every constexpr variant

Each kernel in kernels/*.py is compiled ahead of time with Triton's bundled ptxas for a GPU that need
not be present (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), at the launch
configuration the project picks on CUDA for that architecture (``cuda_config`` of each kernel module),
in bf16 operands and in float32 where the backend runs float32 operands. ``cuobjdump
--dump-resource-usage`` on the cubin then gives registers, stack frame, local memory and shared
memory per kernel. Writes a table plus JSON and markdown under benchmarks/results/, and exits
non-zero if a kernel fails to compile or spills (stack or local memory above 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from atod_fast.kernels import atod_loss, atod_loss_fused, gae, logprobs_entropy

ARCHS = (90, 80)
FLOAT_SCALARS = {"inv_t", "clip_lo", "clip_hi", "dual_c", "kl_coef", "ent_coef", "beta", "log_beta", "log_1mbeta",
                 "gamma", "gamma_lam"}


def signature(fn, ptr_types: dict, constexprs: dict) -> dict:
    """Triton signature of ``fn``: pointers typed by ``ptr_types`` (name -> "*fp32"...), listed float
    scalars fp32, other scalars i32 (strides and sizes), constexprs marked as such."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types[name]
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def variants(full: bool):
    """(kernel name, variant label, jit fn, pointer types, constexprs, launch options) per compile."""
    out = []
    for cc in ARCHS:
        # Chunked row kernels: float32 logits whatever the model dtype.
        f32 = {n: "*fp32" for n in atod_loss._atod_rows_kernel.arg_names if n.endswith("_ptr")}
        f32["tgt_ptr"] = "*i64"
        blocks, launch = atod_loss.cuda_config(cc, vocab=128256)
        combos = (itertools.product((0, 1, 2, 3), (0, 1, 2), (False, True), (False, True), (False, True),
                                    (False, True)) if full
                  else [(1, 2, True, True, True, True), (1, 0, True, False, True, True),
                        (2, 1, False, False, True, True), (0, 0, True, False, False, True),
                        (3, 0, True, True, True, False)])
        for t, d, ref, dual, grad, old in combos:
            if t != 1 and d != 0 and full:
                continue  # DIV only matters with a dense teacher
            c = dict(TEACHER=t, DIV=d, HAS_OLD=old, HAS_REF=ref, HAS_DUAL=dual, WRITE_GRAD=grad, **blocks)
            label = f"teacher={t} div={d} ref={ref} dual={dual} grad={grad}" + ("" if old else " old=False")
            out.append((cc, "_atod_rows_kernel", label, atod_loss._atod_rows_kernel, f32, c, launch))
        blocks, launch = logprobs_entropy.cuda_config(cc, vocab=128256)
        for k in (logprobs_entropy._lpe_fwd_kernel, logprobs_entropy._lpe_bwd_kernel):
            lpe_ptrs = {n: "*i64" if n == "tgt_ptr" else "*fp32" for n in k.arg_names if n.endswith("_ptr")}
            out.append((cc, k.__name__, "", k, lpe_ptrs, dict(blocks), launch))
        gae_ptrs = dict(r_ptr="*fp32", v_ptr="*fp32", m_ptr="*u8", cu_ptr="*i64", boot_ptr="*fp32", adv_ptr="*fp32",
                        ret_ptr="*fp32", bad_ptr="*i32")
        for boot in (False, True):
            out.append((cc, "_gae_kernel", f"boot={boot}", gae._gae_kernel, gae_ptrs,
                        dict(HAS_BOOT=boot, BLOCK=512), dict(num_warps=4)))
        out += _fused_variants(cc, full)
    return out


def _fused_variants(cc, full):
    out = []
    for dt in ("bf16", "fp32"):
        for kern in (atod_loss_fused._fused_stats_kernel, atod_loss_fused._fused_grad_kernel):
            ptrs = {n: "*fp32" for n in kern.arg_names if n.endswith("_ptr")}
            ptrs.update({n: f"*{dt}" for n in ("hs_ptr", "ws_ptr", "ht_ptr", "wt_ptr")})
            ptrs.update(tgt_ptr="*i64", ids_ptr="*i64")
            # (TEACHER, DIV, TLOGITS): TLOGITS reads a dense teacher's logits (in the operands' dtype here).
            # No TEACHER 3: the host runs a sampled teacher's rows as TEACHER 0 (its D needs no kernel).
            combos = ([(t, d, False) for t, d in itertools.product((0, 1, 2), (0, 1, 2))]
                      + [(1, d, True) for d in (0, 1, 2)] if full
                      else [(1, 2, False), (1, 0, False), (2, 1, False), (1, 2, True), (1, 0, True)])
            for t, d, tlogits in combos:
                if t != 1 and d != 0 and full:
                    continue
                blocks, launch = atod_loss_fused.cuda_config(cc, kern.__name__, f32=dt == "fp32", tlogits=tlogits)
                c = dict(TEACHER=t, DIV=d, HAS_BS=True, HAS_BT=t == 1 and not tlogits, TLOGITS=tlogits,
                         PREC="ieee" if dt == "fp32" else None, **blocks)
                if kern is atod_loss_fused._fused_grad_kernel:
                    c.update(NEED_H=True, NEED_W=True, NEED_B=True)
                label = f"{dt} teacher={t} div={d}" + (" logits" if tlogits else "")
                out.append((cc, kern.__name__, label, kern, ptrs, c, launch))
    return out


def cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resources(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", txt)}
    return found


def compile_one(cc, fn, ptrs, constexprs, launch) -> dict:
    src = ASTSource(fn=fn, signature=signature(fn, ptrs, constexprs), constexprs=constexprs)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(launch))
    res = resources(k.asm["cubin"])
    res["triton_shared"] = k.metadata.shared
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every constexpr variant (slow), not a representative set")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter has no compiler to check
    rows, bad = [], []
    print(f"{'sm':>4} {'kernel':24s} {'variant':42s} {'launch':24s} {'reg':>4} {'stack':>5} {'local':>5} "
          f"{'smem':>6}  s")
    for cc, name, label, fn, ptrs, constexprs, launch in variants(args.all):
        blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
        row = dict(sm=cc, kernel=name, variant=label, blocks=blocks, launch=launch)
        try:
            row.update(compile_one(cc, fn, ptrs, constexprs, launch))
        except Exception as e:  # a kernel that does not compile for this GPU is the failure this check is for
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        rows.append(row)
        spill = row.get("stack", 0) > 0 or row.get("local", 0) > 0
        if "error" in row or spill:
            bad.append(row)
        cfg = " ".join(f"{v}" for v in blocks.values()) + " w{num_warps}".format(**launch) + (
            f" s{launch['num_stages']}" if "num_stages" in launch else "")
        print(f"{cc:>4} {name:24s} {label:42s} {cfg:24s} " + (f"ERROR {row['error']}" if "error" in row else
              f"{row['reg']:>4} {row['stack']:>5} {row.get('local', 0):>5} {row['triton_shared']:>6} "
              f"{row['compile_s']:5.1f}" + ("  SPILLS" if spill else "")), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(triton=triton.__version__, archs=list(ARCHS), full=args.all,
                note="compiled ahead of time on a machine without a GPU; resources from cuobjdump")
    (out / "kernel_resources.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    lines = [f"# Triton kernel resources (triton {triton.__version__}, compiled without a GPU)", "",
             "Registers per thread, stack frame and local memory (bytes per thread; above 0 means spills) and "
             "static shared memory (bytes per block) from `cuobjdump --dump-resource-usage`; Triton's dynamic shared "
             "memory (pipelining buffers) from the compiled kernel's metadata.", "",
             "| sm | kernel | variant | blocks | warps / stages | regs | stack | local | static smem | dynamic smem |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ws = f"{r['launch'].get('num_warps')} / {r['launch'].get('num_stages', '-')}"
        blocks = "×".join(str(v) for v in r["blocks"].values())
        lines.append(f"| {r['sm']} | {r['kernel']} | {r['variant']} | {blocks} | {ws} | " + (
            f"error: {r['error']} | | | | |" if "error" in r else
            f"{r['reg']} | {r['stack']} | {r.get('local', 0)} | {r.get('shared', 0)} | {r['triton_shared']} |"))
    (out / "kernel_resources.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/kernel_resources.json and .md; {len(bad)} failing of {len(rows)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
