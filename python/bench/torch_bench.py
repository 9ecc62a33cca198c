"""Benchmark of levattn.torch.lev_attention against dense PyTorch attention, in one run.

    PYTHONPATH=build/python /usr/bin/python3 python/bench/torch_bench.py [--repeats R] [--threads T] [--json]

Cases (issue targets in docs/benchmarks.md): (1, 8, 4096, 64) leverage top-256, forward and
forward + backward; (64, 4, 197, 16) leverage top-32, forward + backward; the Python overhead of
one call; peak memory of forward + backward at (1, 1, 65536, 64) in a fresh process.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import levattn
from levattn.torch import lev_attention


def dense(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def best_time(fn, repeats):
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def inputs(shape, grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).requires_grad_(grad) for _ in range(3)]


def case(shape, top_k, repeats):
    q, k, v = inputs(shape, False)
    ours = dict(select="leverage", top_k=top_k)
    with torch.no_grad():
        fwd_ours = best_time(lambda: lev_attention(q, k, v, **ours), repeats)
        fwd_dense = best_time(lambda: dense(q, k, v), repeats)
        fwd_full = best_time(lambda: lev_attention(q, k, v, select="full"), repeats)
    qg, kg, vg = inputs(shape, True)
    grad = torch.randn(shape)

    def step(f):
        def run():
            for t in (qg, kg, vg):
                t.grad = None
            f(qg, kg, vg).backward(grad)
        return run

    bwd_ours = best_time(step(lambda a, b, c: lev_attention(a, b, c, **ours)), repeats)
    bwd_dense = best_time(step(dense), repeats)
    bwd_full = best_time(step(lambda a, b, c: lev_attention(a, b, c, select="full")), repeats)
    return {"shape": list(shape), "top_k": top_k, "forward_s": fwd_ours, "dense_forward_s": fwd_dense,
            "forward_speedup": fwd_dense / fwd_ours, "forward_backward_s": bwd_ours,
            "dense_forward_backward_s": bwd_dense, "forward_backward_speedup": bwd_dense / bwd_ours,
            "levattn_full_forward_s": fwd_full, "levattn_full_forward_backward_s": bwd_full}


def overhead(repeats):
    # A call whose C++ work is a few microseconds: what remains is the Python layer's cost.
    q, k, v = inputs((1, 1, 4, 4), True)
    with torch.no_grad():
        t_no_grad = best_time(lambda: [lev_attention(q, k, v, top_k=2) for _ in range(100)], repeats) / 100
    t_grad = best_time(lambda: [lev_attention(q, k, v, top_k=2) for _ in range(100)], repeats) / 100
    return {"call_no_grad_s": t_no_grad, "call_with_autograd_s": t_grad}


MEMORY_CHILD = """
import torch
from levattn.torch import lev_attention
def status(field):  # VmRSS now, VmHWM the peak of this process image (ru_maxrss survives exec)
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field + ':'))
base = status('VmRSS')
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, 65536, 64, generator=g).requires_grad_() for _ in range(3))
inputs = 3 * q.numel() * 4
lev_attention(q, k, v, select="leverage", top_k=256).backward(torch.ones(1, 1, 65536, 64))
print(base, inputs, status('VmHWM'))
"""


def memory():
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD], check=True, capture_output=True, text=True).stdout
    base, inputs_bytes, peak = map(int, out.split())
    used = peak - base  # everything the inputs, the call and its gradients added to the process
    limit = 4 * inputs_bytes + 64 * 2**20
    return {"inputs_MiB": inputs_bytes / 2**20, "peak_over_baseline_MiB": used / 2**20,
            "limit_MiB": limit / 2**20, "within_limit": used <= limit}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads for both (torch.set_num_threads also sets OpenMP's, which levattn uses)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r = {"threads": torch.get_num_threads(), "levattn_threads": levattn.build_info()["threads"], "torch": torch.__version__,
         "large": case((1, 8, 4096, 64), 256, a.repeats), "small": case((64, 4, 197, 16), 32, a.repeats),
         "overhead": overhead(a.repeats), "memory": memory()}
    if a.json:
        print(json.dumps(r, indent=1))
        return
    for name in ("large", "small"):
        c = r[name]
        print(f"{tuple(c['shape'])} top-{c['top_k']}: forward {c['forward_s'] * 1e3:.2f} ms vs dense "
              f"{c['dense_forward_s'] * 1e3:.2f} ms ({c['forward_speedup']:.1f}x); forward+backward "
              f"{c['forward_backward_s'] * 1e3:.2f} ms vs dense {c['dense_forward_backward_s'] * 1e3:.2f} ms "
              f"({c['forward_backward_speedup']:.1f}x); levattn select=full {c['levattn_full_forward_s'] * 1e3:.2f} / "
              f"{c['levattn_full_forward_backward_s'] * 1e3:.2f} ms")
    print(f"threads: torch {r['threads']}, levattn {r['levattn_threads']}")
    o, m = r["overhead"], r["memory"]
    print(f"per-call overhead: {o['call_no_grad_s'] * 1e6:.0f} us (no_grad), {o['call_with_autograd_s'] * 1e6:.0f} us "
          f"(autograd)")
    print(f"memory at (1, 1, 65536, 64): inputs {m['inputs_MiB']:.0f} MiB, peak over baseline "
          f"{m['peak_over_baseline_MiB']:.0f} MiB (limit {m['limit_MiB']:.0f} MiB): "
          f"{'within' if m['within_limit'] else 'OVER'}")


if __name__ == "__main__":
    main()
