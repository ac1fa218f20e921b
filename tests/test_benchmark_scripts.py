"""The benchmark scripts that CI runs: the GPU compile check and the GPU suite's dry run."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cuobjdump_present():
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.skipif(not HAS_TRITON or not _cuobjdump_present(), reason="needs triton's NVIDIA backend binaries")
def test_every_kernel_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (tmp_path / "kernel_resources.md").read_text()
    for kernel in ("_atod_rows_kernel", "_fused_stats_kernel", "_fused_grad_kernel", "_lpe_fwd_kernel", "_gae_kernel"):
        assert f"| 90 | {kernel} |" in table and f"| 80 | {kernel} |" in table


@pytest.mark.skipif(not HAS_TRITON or sys.platform != "linux", reason="the dry run needs bash and triton")
def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT_DRY=str(tmp_path / "dry"), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=900, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    out = tmp_path / "dry"
    assert (out / "env.txt").read_text().count("torch:") == 1
    summary = (out / "summary.txt").read_text()
    for step in ("tests", "bench_atod_loss", "bench_gae"):
        assert f"ok     {step}" in summary
    assert (out / "atod_loss_cpu-{}core-{}.json".format(os.cpu_count(), os.uname().machine.replace("_", "-"))).exists()
