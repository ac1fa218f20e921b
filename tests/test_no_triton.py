"""atod-fast imports and runs its torch backends where Triton is missing (macOS, Windows)."""

import subprocess
import sys

SCRIPT = r"""
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is blocked in this test")
        return None

sys.meta_path.insert(0, NoTriton())
sys.path.insert(0, "tests")
import torch
import atod_fast
from loss_cases import make_case

kw = make_case(n=5, h=8, v=50, seed=1)
out = atod_fast.atod_loss(**kw)                       # auto -> torch on the CPU
lp, ent = atod_fast.fused_logprobs_entropy(kw["student_hidden"], kw["student_weight"], kw["target_ids"])
assert torch.isfinite(out.loss) and lp.shape == (5,)
try:
    atod_fast.atod_loss(**kw, backend="triton")
except ValueError as e:
    assert "needs the triton package" in str(e), e
else:
    raise AssertionError("backend='triton' without triton must raise ValueError")
assert "triton" not in sys.modules
print("ok")
"""


def test_import_and_torch_backend_without_triton():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
