"""levattn.torch against what a PyTorch 2 user compares it with, in one run on the CPU.

    .venv/bin/python python/bench/torch_bench.py [--repeats R] [--threads T] [--quick] [--json]
                                                 [--shape B,H,N,D:K ...]

For each shape (batch, heads, n, d) and float32 inputs, forward (no_grad) and forward + backward:
- sdpa: torch.nn.functional.scaled_dot_product_attention (PyTorch's fused CPU kernel),
- flex: FlexAttention compiled (torch.compile), a sliding window + sinks block mask with the same
  key budget as the leverage selection (forward only: inference),
- levattn full, leverage top-k, cluster top-k (levattn.torch.lev_attention);
then bfloat16 inputs against float32 for sdpa and levattn, a compiled model of LevSelfAttention
layers against the same model on SDPA, the Python overhead of one call, and the peak memory of
forward + backward at (1, 1, 65536, 64) in a fresh process. Times are the best
of R after a warm-up; ratios are taken within this run. --quick runs small shapes only (a smoke
run of the script); --shape replaces the list. LEVATTN_ISA=avx2 measures the AVX2 kernels.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

import levattn
from levattn.torch import LevSelfAttention, lev_attention

SHAPES = [((1, 8, 4096, 64), 256), ((1, 8, 16384, 64), 256), ((1, 1, 65536, 64), 256), ((64, 4, 197, 16), 32)]
QUICK_SHAPES = [((1, 2, 1024, 32), 64), ((8, 4, 197, 16), 32)]


def best_time(fn, repeats):
    fn()  # warm-up (and compilation, for the compiled cases)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def inputs(shape, grad, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def flex_window(n, budget, block=128):
    """A compiled FlexAttention call over keys |i - j| <= w plus `sinks` first keys, about `budget`
    keys a query. The block mask is built from its key blocks (BlockMask.from_kv_blocks): block 0
    for the sinks and the blocks the band touches, never an n x n mask."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    sinks = 8
    w = max(1, (budget - sinks) // 2)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= w) | (kv_idx < sinks)

    blocks = (n + block - 1) // block
    rows = []
    for r in range(blocks):
        lo, hi = max(0, r * block - w) // block, min(n - 1, (r + 1) * block - 1 + w) // block
        rows.append(sorted({0, *range(lo, hi + 1)}))
    kv_indices = torch.zeros(1, 1, blocks, blocks, dtype=torch.int32)  # blocks x blocks: per block, not per entry
    kv_num = torch.zeros(1, 1, blocks, dtype=torch.int32)
    for r, x in enumerate(rows):
        kv_indices[0, 0, r, :len(x)] = torch.tensor(x, dtype=torch.int32)
        kv_num[0, 0, r] = len(x)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n))
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def methods(shape, top_k):
    n = shape[-2]
    return {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "levattn_full": lambda q, k, v: lev_attention(q, k, v, select="full"),
        "levattn_leverage": lambda q, k, v: lev_attention(q, k, v, select=f"leverage:{top_k}"),
        "levattn_cluster": lambda q, k, v: lev_attention(q, k, v, select=f"cluster:{top_k}"),
        "flex_window_sinks": flex_window(n, top_k),
    }


def forward_backward(f, q, k, v, grad):
    def run():
        for t in (q, k, v):
            t.grad = None
        f(q, k, v).backward(grad)
    return run


def case(shape, top_k, repeats, log):
    row = {"shape": list(shape), "top_k": top_k, "forward_s": {}, "forward_backward_s": {}}
    q, k, v = inputs(shape, False)
    qg, kg, vg = inputs(shape, True)
    grad = torch.randn(shape)
    for name, f in methods(shape, top_k).items():
        with torch.no_grad():
            row["forward_s"][name] = best_time(lambda: f(q, k, v), repeats)
        if name != "flex_window_sinks":  # inference only
            row["forward_backward_s"][name] = best_time(forward_backward(f, qg, kg, vg, grad), repeats)
    for kind in ("forward_s", "forward_backward_s"):
        base = row[kind]["sdpa"]
        row[kind.replace("_s", "_vs_sdpa")] = {name: base / t for name, t in row[kind].items()}
    # bfloat16 inputs against float32, the same method.
    qb, kb, vb = inputs(shape, False, torch.bfloat16)
    with torch.no_grad():
        row["bf16_forward_s"] = {
            "sdpa": best_time(lambda: F.scaled_dot_product_attention(qb, kb, vb), repeats),
            "levattn_leverage": best_time(lambda: lev_attention(qb, kb, vb, select=f"leverage:{top_k}"), repeats),
        }
    print_case(row, log)
    return row


def print_case(c, log):
    if not log:
        return
    print(f"{tuple(c['shape'])} top-{c['top_k']}")
    for kind in ("forward", "forward_backward"):
        cells = ", ".join(f"{name} {t * 1e3:.1f} ms ({c[kind + '_vs_sdpa'][name]:.2f}x)" for name, t in c[kind + "_s"].items())
        print(f"  {kind} (x = speed-up over sdpa): {cells}")
    bf = c["bf16_forward_s"]
    print(f"  bf16 forward: sdpa {bf['sdpa'] * 1e3:.1f} ms (fp32 {c['forward_s']['sdpa'] * 1e3:.1f}), levattn "
          f"leverage {bf['levattn_leverage'] * 1e3:.1f} ms (fp32 {c['forward_s']['levattn_leverage'] * 1e3:.1f})",
          flush=True)


def model_case(repeats, quick):
    """A compiled 4-layer model of LevSelfAttention (leverage top-32) against the same model on SDPA."""
    b, n, e, heads = (8, 197, 64, 4) if quick else (64, 197, 64, 4)

    class SDPASelfAttention(LevSelfAttention):  # the same parameters, SDPA for the attention
        def forward(self, x):
            bb, nn_, ee = x.shape
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(bb, nn_, 3, self.num_heads,
                                                                               self.head_dim).permute(2, 0, 3, 1, 4)
            return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bb, nn_, ee))

    def model(layer):
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Sequential(layer(), torch.nn.Linear(e, e)) for _ in range(4)])

    x = torch.randn(b, n, e)
    out = {"shape": [b, n, e, heads]}
    for name, layer in (("sdpa", lambda: SDPASelfAttention(e, heads, select="full")),
                        ("levattn_leverage", lambda: LevSelfAttention(e, heads, select="leverage:32"))):
        m = torch.compile(model(layer), fullgraph=True)
        with torch.no_grad():
            out[f"{name}_forward_s"] = best_time(lambda: m(x), repeats)

        def step():
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        out[f"{name}_forward_backward_s"] = best_time(step, repeats)
    return out


def overhead(repeats):
    # A call whose C++ work is a few microseconds: what remains is the Python layer's cost.
    q, k, v = inputs((1, 1, 4, 4), True)
    with torch.no_grad():
        t_no_grad = best_time(lambda: [lev_attention(q, k, v, select="leverage:2") for _ in range(100)], repeats) / 100
    t_grad = best_time(lambda: [lev_attention(q, k, v, select="leverage:2") for _ in range(100)], repeats) / 100
    return {"call_no_grad_s": t_no_grad, "call_with_autograd_s": t_grad}


MEMORY_CHILD = """
import torch
from levattn.torch import lev_attention
def status(field):  # VmRSS now, VmHWM the peak of this process image
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field + ':'))
base = status('VmRSS')
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, 65536, 64, generator=g).requires_grad_() for _ in range(3))
inputs = 3 * q.numel() * 4
lev_attention(q, k, v, select="leverage:256").backward(torch.ones(1, 1, 65536, 64))
print(base, inputs, status('VmHWM'))
"""


def memory():
    """Peak memory of forward + backward at (1, 1, 65536, 64), leverage top-256, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD], check=True, capture_output=True, text=True).stdout
    base, inputs_bytes, peak = map(int, out.split())
    used = peak - base  # everything the inputs, the call and its gradients added to the process
    return {"inputs_MiB": inputs_bytes / 2**20, "peak_over_baseline_MiB": used / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads (torch.set_num_threads also sets levattn's: one OpenMP runtime)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", action="append", default=[], metavar="B,H,N,D:K",
                    help="run this shape with budget K instead of the default list (repeatable)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = QUICK_SHAPES if a.quick else SHAPES
    if a.shape:
        shapes = [(tuple(int(x) for x in dims.split(",")), int(k)) for dims, k in (t.split(":") for t in a.shape)]
    info = levattn.build_info()
    if not a.json:
        print(f"torch {torch.__version__}, threads: torch {torch.get_num_threads()}, levattn {info['threads']}, "
              f"ISA {info['isa']}", flush=True)
    r = {"threads": torch.get_num_threads(), "levattn_threads": info["threads"], "torch": torch.__version__,
         "isa": info["isa"], "cases": [case(s, k, a.repeats, not a.json) for s, k in shapes],
         "model": model_case(a.repeats, a.quick), "overhead": overhead(a.repeats), "memory": memory()}
    if a.json:
        print(json.dumps(r, indent=1))
        return
    m, o = r["model"], r["overhead"]
    print(f"compiled model {tuple(m['shape'])}: forward sdpa {m['sdpa_forward_s'] * 1e3:.1f} ms, levattn "
          f"{m['levattn_leverage_forward_s'] * 1e3:.1f} ms; forward+backward sdpa "
          f"{m['sdpa_forward_backward_s'] * 1e3:.1f} ms, levattn {m['levattn_leverage_forward_backward_s'] * 1e3:.1f} ms")
    print(f"per-call overhead: {o['call_no_grad_s'] * 1e6:.0f} us (no_grad), {o['call_with_autograd_s'] * 1e6:.0f} us "
          f"(autograd)")
    mem = r["memory"]
    print(f"memory of forward+backward at (1, 1, 65536, 64) leverage top-256: inputs {mem['inputs_MiB']:.0f} MiB, "
          f"peak over baseline {mem['peak_over_baseline_MiB']:.0f} MiB")


if __name__ == "__main__":
    main()
