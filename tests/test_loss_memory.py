"""Peak memory of the chunked torch backend against the reference, each in a fresh process."""

import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("peak_rss_worker.py")


def peak_extra(backend):
    res = subprocess.run([sys.executable, str(WORKER), backend], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peak, loss = res.stdout.split()
    return int(peak), float(loss)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_torch_backend_peak_memory_under_a_tenth_of_reference():
    # N = 4096, H = 64, V = 65536 with a dense teacher: one [N, V] float32 tensor is 1 GiB.
    ref_peak, ref_loss = peak_extra("reference")
    tri_peak, tri_loss = peak_extra("torch")
    assert abs(tri_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert ref_peak > 2 << 30, f"reference peak {ref_peak / 2**20:.0f} MiB: the measurement is not seeing [N, V]"
    assert tri_peak < 0.1 * ref_peak, f"torch {tri_peak / 2**20:.0f} MiB vs reference {ref_peak / 2**20:.0f} MiB"
