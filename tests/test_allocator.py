"""``keep_freed_blocks``: a freed large tensor's pages are reused by the next one instead of faulted in again."""

import json
import os
import subprocess
import sys

import pytest

# Minor page faults of allocating and filling a 64 MiB tensor, twice (the first one freed before the second).
WORKER = r"""
import json, resource, sys, torch
from atod_fast.trainer.allocator import keep_freed_blocks

set_ = keep_freed_blocks(torch.device(sys.argv[1]))
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(json.dumps({"set": set_, "faults": faults}))
"""
PAGES = (64 << 20) // 4096


def run(device: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ATOD_FAST_KEEP"))}
    out = subprocess.run([sys.executable, "-c", WORKER, device], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")


def test_freed_blocks_are_reused_without_page_faults():
    kept = run("cpu")
    assert kept["set"] is True
    assert kept["faults"][0] > PAGES // 2  # the first 64 MiB is faulted in
    assert kept["faults"][1] < PAGES // 10  # the second reuses the freed pages


def test_default_malloc_faults_the_pages_in_again():
    """The same two allocations where the thresholds are left alone: the baseline the test above improves on."""
    default = run("cpu", ATOD_FAST_KEEP_FREED="0")
    assert default["set"] is False
    assert min(default["faults"]) > PAGES // 2


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_the_users_malloc_settings_stand(env):
    assert run("cpu", **env)["set"] is False


def test_other_devices_leave_malloc_alone():
    assert run("meta")["set"] is False
