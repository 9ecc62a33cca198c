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
    # 4 Python threads x 600 calls of the op, forward and backward, over three selections, while a
    # fifth thread runs PyTorch's own parallel kernels: every output and gradient bit for bit the
    # serial one, and every thread done within the time limit (no deadlock).
    g = torch.Generator().manual_seed(1)
    selections = ["leverage:16+window:2", "topk:8", "cluster:8+probe:2"]
    cases = [(tuple(torch.randn(2, 3, n, 16, generator=g) for _ in range(3)), sel)
             for n in (64, 200, 300) for sel in selections]
    grad_out = [torch.randn(2, 3, n, 16, generator=g) for n in (64, 200, 300) for _ in selections]

    def call(idx, backward):
        (q, k, v), sel = cases[idx]
        if not backward:
            return (lev_attention(q, k, v, select=sel),)
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        out = lev_attention(q, k, v, select=sel)
        out.backward(grad_out[idx])
        return out.detach(), q.grad, k.grad, v.grad

    expected = {(idx, backward): call(idx, backward) for idx in range(len(cases)) for backward in (False, True)}
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    product = a @ b
    failures, calls = [], []

    def caller(seed):
        for step in range(600):
            key = ((seed + step) % len(cases), step % 3 == 0)
            got = call(*key)
            if not all(torch.equal(x, y) for x, y in zip(got, expected[key])):
                failures.append(f"thread {seed} call {step} {cases[key[0]][1]}: a different result")
                return
            calls.append(1)

    def torch_worker():
        for _ in range(300):  # PyTorch's own parallel kernels meanwhile
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
    assert len(calls) == 2400
