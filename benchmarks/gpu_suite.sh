#!/usr/bin/env bash
# One command for an offline CUDA machine: GPU tests, loss and GAE benchmarks, the step profile.
#
#   benchmarks/gpu_suite.sh                 # on the GPU machine (about 8 minutes on an H100/H200)
#   benchmarks/gpu_suite.sh --dry-run       # same code paths at tiny shapes on the CPU (TRITON_INTERPRET=1)
#   WHEELS=/path/to/wheels benchmarks/gpu_suite.sh   # install liger-kernel from a carried wheel first
#
# Needs torch, triton and transformers installed; nothing is downloaded. Everything goes under
# benchmarks/results/gpu-<device>-<date>/ (or dryrun-<date>/): env.txt (device, versions, date), one
# log per step, and the JSON/markdown results. A step that fails is recorded in summary.txt and the
# suite goes on; the exit status is non-zero if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}

if [ "$DRY" = 1 ]; then
  # No torch.compile in the dry run (minutes of C++ compilation on a small CPU); everything else runs.
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ATOD_FAST_COMPILE=0
  DEV=dryrun
else
  DEV=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
        | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-*$//')
  if [ -z "$DEV" ]; then echo "gpu_suite: no CUDA device (use --dry-run on a CPU machine)" >&2; exit 2; fi
fi
OUT=${OUT:-benchmarks/results/gpu-$DEV-$(date -u +%Y%m%d-%H%M)}
[ "$DRY" = 1 ] && OUT=${OUT_DRY:-$(mktemp -d)/dryrun-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/liger_kernel-*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-index --no-deps "$WHEELS"/liger_kernel-*.whl > "$OUT/pip-liger.log" 2>&1 \
    || echo "liger-kernel wheel did not install (see pip-liger.log); Liger providers skipped" | tee -a "$SUMMARY"
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu: none"
  $PY - <<'EOF'
import importlib.metadata as md
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)")
print("cuda:", torch.version.cuda)
for p in ("torch", "triton", "transformers", "liger-kernel", "atod-fast"):
    try:
        print(f"{p}: {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p}: not installed")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "ok     $name ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else
    echo "FAILED $name ($((SECONDS - t0)) s, exit $?; see $name.log)" | tee -a "$SUMMARY"
    tail -5 "$OUT/$name.log"
    FAILED=1
  fi
}

if [ "$DRY" = 1 ]; then
  step tests 300 $PY -m pytest -q -x tests/test_loss_fused.py tests/test_gae.py \
       -k "(test_matches_reference_fp32 and jsd) or (test_all_actions_equals_textbook_gae and 37)"
  step bench_atod_loss 300 $PY benchmarks/bench_atod_loss.py --shapes "16,16,16,128" --reps 1 \
       --providers matmul,reference,torch,triton,triton_fused,liger --configs distill,atod --out "$OUT"
  step bench_gae 120 $PY benchmarks/bench_gae.py --batch 4 --lengths 64 --repeats 1 --loop-repeats 1 \
       --out "$OUT/bench_gae_cpu.json"
else
  step tests 120 $PY -m pytest -q tests/test_loss_fused.py tests/test_logprobs_entropy.py tests/test_gae.py
  # Liger's JSD shapes: 1k-8k tokens x 4096 x 128256, bf16, every backend, Liger, and the bf16 matmul rate.
  step bench_atod_loss 270 $PY benchmarks/bench_atod_loss.py \
       --shapes "1024,4096,4096,128256;2048,4096,4096,128256;4096,4096,4096,128256;8192,4096,4096,128256" \
       --providers matmul,torch,triton,triton_fused,liger,liger_jsd,reference --configs distill,atod \
       --reps 5 --out "$OUT"
  step bench_gae 60 $PY benchmarks/bench_gae.py --device cuda --out "$OUT/bench_gae_cuda.json"
fi

if [ -f benchmarks/profile_step.py ]; then
  if [ "$DRY" = 1 ]; then
    step profile_step 240 $PY benchmarks/profile_step.py --dry-run --out "$OUT"
  else
    step profile_step 150 $PY benchmarks/profile_step.py --device cuda --out "$OUT"
  fi
else
  echo "skipped profile_step: benchmarks/profile_step.py is not in this checkout" | tee -a "$SUMMARY"
fi

echo "results in $OUT"
exit $FAILED
