"""service/allocator.py: per-image buffers reuse the heap instead of fresh pages, measured in
fresh processes (the policy is process-wide, and glibc's adaptation depends on history)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from service.allocator import keep_freed_memory
from service.config import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a front end allocates per image, in its order: the engine input (196 KB), the map
# copied out of its slot (256 KB), small objects between them; each freed a moment later.
_CHURN = """
import json, resource, sys
import numpy as np
from service.allocator import keep_freed_memory
in_force = keep_freed_memory(int(sys.argv[1]))
image, heat = np.ones((256, 256, 3), np.uint8), np.ones((256, 256), np.float32)
def request():
    tensor = image.copy()
    small = [bytes(100) for _ in range(20)]
    copied = heat.copy()
    del tensor, small, copied
for _ in range(50):
    request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    request()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"in_force": in_force, "faults_per_request": faults / 2000}))
"""


def _churn(retain_bytes: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHURN, str(retain_bytes)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt; "
                    "other C libraries keep their own (service/allocator.py)")
def test_freed_buffers_are_reused_not_faulted_in_again() -> None:
    default = _churn(0)
    kept = _churn(Settings().heap_retain_mb << 20)
    assert default["in_force"] is False and kept["in_force"] is True
    # glibc's adaptive default gives the heap's top back after each request and faults the
    # next request's buffers in again (80 pages a request on the machine this was written on).
    assert default["faults_per_request"] >= 20, default
    assert kept["faults_per_request"] < 0.5, kept


# 100 MB of 1 MB buffers (heap chunks under the policy), all freed: what stays resident.
_BURST = """
import json, sys
import numpy as np
from service.allocator import keep_freed_memory
def resident_mb():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
keep_freed_memory(int(sys.argv[1]))
before = resident_mb()
held = [np.ones(1 << 20, np.uint8) for _ in range(100)]
peak = resident_mb()
del held
print(json.dumps({"before": before, "peak": peak, "after": resident_mb()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt; "
                    "other C libraries keep their own (service/allocator.py)")
@pytest.mark.parametrize("retain_mb", [16, 64])
def test_a_burst_past_the_bound_is_given_back_down_to_it(retain_mb: int) -> None:
    out = subprocess.run([sys.executable, "-c", _BURST, str(retain_mb << 20)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    rss = json.loads(out.stdout)
    assert rss["peak"] - rss["before"] >= 95, rss  # the burst was resident
    assert rss["after"] - rss["before"] <= retain_mb + 4, rss  # what is kept free stays under the bound


def test_zero_leaves_the_allocator_alone() -> None:
    assert keep_freed_memory(0) is False
    assert Settings(heap_retain_mb=0).heap_retain_mb == 0
    with pytest.raises(ValueError):
        Settings(heap_retain_mb=-1)
