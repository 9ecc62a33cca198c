"""Under an address-space limit (RLIMIT_AS, what ulimit -v sets) below what a call needs, the
call raises MemoryError naming what did not fit, never a crash, a hang or the OOM killer, and the
process goes on: with the limit lifted, a call then succeeds."""
import subprocess
import sys

import pytest

import levattn

# Run in a child: the limit is set after the imports (OpenBLAS reserves its buffers at load), at the
# process's size plus `extra` bytes, and a call over (200000, 64) float32 arrays is made.
CHILD = r"""
import resource, sys
import numpy as np
import levattn
n = 200000
q = np.ones((n, 64), np.float32)
k, v = q.copy(), q.copy()
with open("/proc/self/status") as f:
    size = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), resource.RLIM_INFINITY))
try:
    out = levattn.attention(q, k, v, sys.argv[2])
    print("ok", out.shape)
except MemoryError as e:
    print("MemoryError:", e)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
small = np.ones((64, 8), np.float32)
assert levattn.attention(small, small, small, "leverage:4").shape == (64, 8)
print("after: ok")
"""


@pytest.mark.skipif(levattn.build_info()["sanitizers"], reason="AddressSanitizer reserves more than any limit allows")
@pytest.mark.parametrize("select", ["leverage:64", "window:16+sinks:4"])  # linear in n
def test_attention_under_a_memory_limit_raises_memory_error_or_runs(select):
    outcomes = []
    for extra_mb in (20, 60, 150, 300, 600):
        p = subprocess.run([sys.executable, "-c", CHILD, str(extra_mb * 10**6), select], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, f"{extra_mb} MB over: exit {p.returncode}, {p.stderr[-800:]}"
        first, after = p.stdout.splitlines()[-2:]
        assert after == "after: ok"
        if first.startswith("MemoryError:"):
            # The array and its bytes, or the working buffer that did not fit.
            assert ("allocate" in first and ("bytes" in first or "MiB" in first)) or "working buffer" in first, first
        else:
            assert first == "ok (200000, 64)", first
        outcomes.append(first.split(":")[0].split()[0])
    assert outcomes[0] == "MemoryError" and outcomes[-1] == "ok", outcomes
