"""benchmarks/profile_step.py --dry-run: the profiler's code path (and the Qwen-shaped preset's) in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"


@pytest.mark.parametrize("preset", [None, "qwen2.5-0.5b-7b"])
def test_dry_run_writes_phases_trace_and_top_ops(tmp_path, preset):
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), *(["--preset", preset] if preset else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATOD_FAST_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "phases.json").read_text())
    phases = res["phases_total_s"]
    for p in ("rollout", "student pass", "teacher scoring", "advantages", "update"):
        assert phases[p] > 0, p
    assert abs(sum(v for k, v in phases.items() if k != "step") - phases["step"]) < 1e-6
    assert 0 < len(res["top_ops"]) <= 20 and res["profiled_steps"] == 2
    assert (tmp_path / "trace.json").stat().st_size > 0
    assert "| update |" in (tmp_path / "phases.md").read_text()
