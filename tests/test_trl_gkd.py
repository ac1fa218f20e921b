"""examples/trl_gkd.py: TRL's GKDTrainer with atod_loss as its loss, equal to TRL's own on the same batch.

Runs the example in a subprocess from outside the repository's root (the root's ``kernels/`` would
hide the Hugging Face ``kernels`` package that trl imports); skipped where trl is not installed.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")


def test_gkd_with_atod_loss_matches_trl_and_trains(tmp_path):
    # On-policy (lmbda = 1: the student generates), β = 0 (forward KL), the teacher given as logits.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "trl_gkd.py"), "--steps", "2", "--lmbda", "1", "--beta", "0",
         "--teacher", "logits", "--backend", "torch"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    comparisons = summary["comparisons"]
    assert {(c["beta"], c["teacher"]) for c in comparisons} == {
        (b, t) for b in (0.0, 0.3, 0.5, 1.0) for t in ("hidden", "logits")}
    for c in comparisons:
        assert c["trl"] > 0 and abs(c["atod"] - c["trl"]) <= 1e-5 * c["trl"], c
    # num_items_in_batch (twice the masked-in tokens here) halves the masked mean, in both.
    by_key = {(c["beta"], c["teacher"], c["num_items"] is None): c["atod"] for c in comparisons}
    assert by_key[(0.5, "hidden", False)] == pytest.approx(by_key[(0.5, "hidden", True)] / 2, rel=1e-6)
    losses = summary["train_losses"]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert summary["head_moved"] > 0  # the optimizer stepped on atod_loss's gradient
