"""levattn and PyTorch in one process: one OpenMP runtime, so torch.set_num_threads sets levattn's
threads too; results independent of the thread count; Python threads calling the op while
PyTorch runs its own parallel kernels neither deadlock nor change any result."""
import subprocess
import sys
import threading

import pytest
import torch

import levattn
from levattn.torch import lev_attention


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_runtime_torch_sets_levattn_threads(restore_threads):
    # In a fresh process: other packages the suite imports (scikit-learn through transformers)
    # bring OpenMP runtimes of their own; torch and levattn must share one.
    code = ("import torch, levattn, levattn.torch; "
            "print(len({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "1"
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        assert levattn.build_info()["threads"] == threads


def test_same_bits_for_any_thread_count(restore_threads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 700, 32, generator=g).requires_grad_() for _ in range(3))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for t in (q, k, v):
            t.grad = None
        out = lev_attention(q, k, v, select="leverage:64+window:8+sinks:2")
        out.square().sum().backward()
        results.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.timeout(300)
def test_python_threads_and_torch_kernels_at_once():
    g = torch.Generator().manual_seed(1)
    cases = [tuple(torch.randn(2, 3, n, 16, generator=g) for _ in range(3)) for n in (64, 200, 300)]
    expected = [lev_attention(q, k, v, select="leverage:16+window:2") for q, k, v in cases]
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    product = a @ b
    failures = []

    def caller(seed):
        for step in range(400):
            idx = (seed + step) % len(cases)
            q, k, v = cases[idx]
            out = lev_attention(q, k, v, select="leverage:16+window:2")
            if not torch.equal(out, expected[idx]):
                failures.append(f"thread {seed} call {step}: a different output")
                return

    def torch_worker():
        for _ in range(200):  # PyTorch's own parallel kernels meanwhile
            if not torch.allclose(a @ b, product):
                failures.append("torch matmul changed")
                return
            torch.softmax(a, dim=-1).sum()

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(4)] + [threading.Thread(target=torch_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a thread did not finish: deadlock"
    assert not failures, failures
