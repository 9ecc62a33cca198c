#!/usr/bin/env python3
"""The contract of levattn-mpi under mpirun -np 1 to 4, against the single-process levattn.

Usage: python3 tests/mpi_contract.py MPIEXEC /path/to/levattn-mpi /path/to/levattn

For shard sizes that do not divide n (n = 1001 over 2, 3 and 4 ranks; m != n; 3-D stacks), every
output of `mpirun -np P levattn-mpi CMD` must equal `levattn CMD` on the same files: attention
within 1e-6 (relative, Frobenius), universal sets and heavy entries exactly (values to 1e-9).
The two-round mode is checked against its guarantee (a superset of the single-process set) and
its output against float64 numpy attention over the set it used. Per-rank bytes of the leverage
modes must not grow with n. Faults (a NaN on the last rank only, a truncated file, bad
arguments, an unwritable output) must end every rank within 10 s with exit code 2, the message
printed once, and leave an existing output untouched. A rank killed (SIGKILL) in the middle of
attend (leverage and the ring) and universal must end every rank within 10 s with a non-zero
exit code, no output written, an existing output untouched and no temporary file left.

Prints the failed checks and "<passed> passed, <failed> failed"; exits 1 when any check failed.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

if len(sys.argv) != 4:
    sys.stderr.write("usage: mpi_contract.py MPIEXEC levattn-mpi levattn\n")
    sys.exit(2)

MPIEXEC, MPI_BIN, BIN = sys.argv[1], os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
PASSED = 0
FAILED = []
WORK = None


def check(name, ok, detail=""):
    global PASSED
    if ok:
        PASSED += 1
    else:
        FAILED.append(name)
        print("FAIL: %s%s" % (name, (": " + detail) if detail else ""), flush=True)
    return ok


def group(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - an error in a group is one failed check, reported
        check(fn.__name__ + " (raised)", False, traceback.format_exc())


def run_mpi(np_, *args, timeout=60):
    cmd = [MPIEXEC, "-n", str(np_), "--oversubscribe", MPI_BIN] + [str(a) for a in args]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                       universal_newlines=True)
    p.seconds = time.time() - t0
    return p


def run_single(*args):
    return subprocess.run([BIN] + [str(a) for a in args], cwd=WORK, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120, universal_newlines=True)


def ok(name, p):
    return check(name + ": exit 0", p.returncode == 0, "rc=%d stderr=%r" % (p.returncode, p.stderr[-1500:]))


def path(name):
    return os.path.join(WORK, name)


def save(name, a):
    np.save(path(name), np.ascontiguousarray(a, dtype=np.float32))


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-300))


def keys(rng, n, d):
    """Keys with log-normal norms: a few of high leverage among many of low."""
    return rng.standard_normal((n, d)) * np.exp(1.5 * rng.standard_normal((n, 1)))


def make_inputs():
    rng = np.random.default_rng(7)
    n, m, d, dv = 1001, 700, 16, 8
    K = keys(rng, n, d)
    save("K.npy", K)
    save("Q.npy", rng.standard_normal((n, d)))
    save("V.npy", rng.standard_normal((n, dv)))
    save("Qc.npy", rng.standard_normal((m, d)))  # cross attention: m != n
    save("Ql.npy", rng.standard_normal((1300, d)))  # more queries than keys: some windows hold no key
    save("K3.npy", np.stack([K, keys(rng, n, d)]))
    save("Q3.npy", rng.standard_normal((2, n, d)))
    save("V3.npy", rng.standard_normal((2, n, dv)))


def same_attention(label, single_args, mpi_args, ranks=(1, 2, 3, 4)):
    """levattn attend ARGS --out ref.npy, then levattn-mpi at each rank count: within 1e-6."""
    if not ok(label + " single", run_single("attend", *single_args, "--out", "ref.npy")):
        return
    ref = np.load(path("ref.npy"))
    for P in ranks:
        p = run_mpi(P, "attend", *mpi_args, "--out", "out.npy", "--json")
        if not ok("%s np%d" % (label, P), p):
            continue
        out = np.load(path("out.npy"))
        check("%s np%d: shape" % (label, P), out.shape == ref.shape, str(out.shape))
        e = rel(out, ref)
        check("%s np%d: equals levattn within 1e-6" % (label, P), e <= 1e-6, "relative error %.3g" % e)
        j = json.loads(p.stdout)
        check("%s np%d: one JSON entry per rank" % (label, P), len(j["per_rank"]) == P)
        check("%s np%d: no temporary left" % (label, P), not [f for f in os.listdir(WORK) if ".tmp." in f])


def test_attention():
    qkv = ["--queries", "Q.npy", "--keys", "K.npy", "--values", "V.npy"]
    lev = ["--select", "leverage+eps:0.02"]
    same_attention("leverage", qkv + lev, qkv + lev)
    lev_local = ["--select", "leverage+eps:0.02+window:3+sinks:2"]
    same_attention("leverage+window+sinks", qkv + lev_local, qkv + lev_local)
    # A window wider than a shard: the halo spans several ranks.
    wide = ["--select", "window:300+sinks:5"]
    same_attention("window 300 (halo over ranks)", qkv + wide, qkv + wide, ranks=(3, 4))
    stack = ["--queries", "Q3.npy", "--keys", "K3.npy", "--values", "V3.npy"]
    same_attention("full ring, 3-D", stack + ["--select", "full"], stack + ["--select", "full"])
    poly = ["--select", "leverage+eps:0.02+kernel:poly+p:2"]
    same_attention("leverage, 3-D, poly p 2", stack + poly, stack + poly, ranks=(1, 4))
    cross = ["--queries", "Qc.npy", "--keys", "K.npy", "--values", "V.npy"]
    same_attention("cross attention m != n, leverage", cross + lev, cross + lev, ranks=(2, 3))
    same_attention("cross attention m != n, full", cross + ["--select", "full"], cross + ["--select", "full"],
                   ranks=(3,))
    longer = ["--queries", "Ql.npy", "--keys", "K.npy", "--values", "V.npy", "--select", "leverage+eps:0.02+window:3+sinks:1"]
    same_attention("m > n + w, leverage and window", longer, longer, ranks=(1, 3))


def test_two_round():
    """Two rounds with |x|^4: a superset of levattn's set; the output is attention over that set."""
    if not ok("universal p 4 single", run_single("universal", "--keys", "K3.npy", "--eps", "0.01", "--p", "4",
                                                 "--out", "ref.npz")):
        return
    ref = np.load(path("ref.npz"))
    for P in (2, 4):
        p = run_mpi(P, "universal", "--keys", "K3.npy", "--eps", "0.01", "--p", "4", "--rounds", "2", "--out", "u.npz")
        if not ok("two-round universal np%d" % P, p):
            continue
        u = np.load(path("u.npz"))
        for h in range(2):
            a = set(ref["indices"][ref["offsets"][h]:ref["offsets"][h + 1]].tolist())
            b = u["indices"][u["offsets"][h]:u["offsets"][h + 1]]
            check("two-round np%d pair %d: contains the single-process set" % (P, h), a <= set(b.tolist()),
                  "%d of %d missing" % (len(a - set(b.tolist())), len(a)))
        p = run_mpi(P, "attend", "--queries", "Q3.npy", "--keys", "K3.npy", "--values", "V3.npy", "--select",
                    "leverage+eps:0.01+kernel:poly+p:4", "--rounds", "2", "--out", "o.npy")
        if not ok("two-round attend np%d" % P, p):
            continue
        Q, K, V = (np.load(path(f)).astype(np.float64) for f in ("Q3.npy", "K3.npy", "V3.npy"))
        out = np.load(path("o.npy"))
        for h in range(2):
            S = u["indices"][u["offsets"][h]:u["offsets"][h + 1]]
            w = np.abs(Q[h] @ K[h][S].T) ** 4
            O = (w / w.sum(1, keepdims=True)) @ V[h][S]
            e = rel(out[h], O)
            check("two-round attend np%d pair %d: float64 attention over its set" % (P, h), e <= 1e-5, "%.3g" % e)
    p = run_mpi(2, "universal", "--keys", "K.npy", "--eps", "0.01", "--p", "4")
    check("p 4 without two rounds: exit 2", p.returncode == 2 and "two-round" in p.stderr, p.stderr[-500:])


def test_universal_and_heavy():
    if ok("universal single", run_single("universal", "--keys", "K3.npy", "--eps", "0.01", "--out", "ref.npz")):
        ref = np.load(path("ref.npz"))
        for P in (1, 2, 3, 4):
            p = run_mpi(P, "universal", "--keys", "K3.npy", "--eps", "0.01", "--out", "u.npz")
            if not ok("universal np%d" % P, p):
                continue
            u = np.load(path("u.npz"))
            same = all(np.array_equal(ref[k], u[k]) for k in ("indices", "offsets"))
            check("universal np%d: the single-process sets" % P, same)
            if same:
                check("universal np%d: scores to 1e-6" % P, np.allclose(ref["scores"], u["scores"], rtol=1e-6))
    for label, q, k in (("2-D", "Q.npy", "K.npy"), ("3-D", "Q3.npy", "K3.npy"), ("m != n", "Qc.npy", "K.npy")):
        if not ok("heavy %s single" % label, run_single("heavy", "--queries", q, "--keys", k, "--eps", "0.05",
                                                           "--out", "ref.npz")):
            continue
        ref = np.load(path("ref.npz"))
        for P in (1, 3, 4):
            p = run_mpi(P, "heavy", "--queries", q, "--keys", k, "--eps", "0.05", "--out", "h.npz")
            if not ok("heavy %s np%d" % (label, P), p):
                continue
            h = np.load(path("h.npz"))
            names = [x for x in ref.files if x != "value"]
            check("heavy %s np%d: the single-process entries" % (label, P),
                  sorted(h.files) == sorted(ref.files) and all(np.array_equal(ref[x], h[x]) for x in names) and
                  np.allclose(ref["value"], h["value"], rtol=1e-9, atol=0), "%d vs %d entries" %
                  (len(h["query"]), len(ref["query"])))


def test_bytes_do_not_grow_with_n():
    """Per-rank bytes of leverage (window and sinks included) at n = 4000 and 40000: the same
    order (|U| and the halo, not n); the ring's bytes grow with n."""
    rng = np.random.default_rng(3)
    d, dv = 16, 8
    rows = {}
    for n in (4000, 40000):
        save("Kb.npy", rng.standard_normal((n, d)))  # Gaussian keys: |U| about d / eps at most
        save("Qb.npy", rng.standard_normal((n, d)))
        save("Vb.npy", rng.standard_normal((n, dv)))
        for sel in (["--select", "leverage+eps:0.05+window:4+sinks:4"], ["--select", "full"]):
            p = run_mpi(4, "attend", "--queries", "Qb.npy", "--keys", "Kb.npy", "--values", "Vb.npy", *sel,
                        "--out", "ob.npy", "--json", timeout=120)
            if ok("bytes n %d %s" % (n, sel[1]), p):
                j = json.loads(p.stdout)
                rows[(n, j["select"])] = (max(r["bytes_sent"] + r["bytes_received"] for r in j["per_rank"]),
                                     j["shared_sizes"][0])
    if len(rows) != 4:
        return
    (b_small, u_small), (b_large, u_large) = rows[(4000, "leverage")], rows[(40000, "leverage")]
    # d^2 Gram, |U| (d + dv) rows and indices, a halo of 2 w + sinks rows, O(P) sizes and flags.
    bound = lambda u: 2 * (8 * d * d + u * (4 * (d + dv) + 16) + 4 * (2 * 4 + 4) * 4 * (d + dv) + 1024)
    check("leverage bytes within the n-independent bound (n 4000)", b_small <= bound(u_small), "%d > %d" % (b_small, bound(u_small)))
    check("leverage bytes within the n-independent bound (n 40000)", b_large <= bound(u_large), "%d > %d" % (b_large, bound(u_large)))
    check("ring bytes grow with n", rows[(40000, "full")][0] > 5 * rows[(4000, "full")][0])


def fault(label, np_, args, expect):
    """A run that must fail: exit 2 on every rank within 10 s, the message once, no output."""
    with open(path("keep.npy"), "wb") as f:
        f.write(b"existing output")
    p = run_mpi(np_, *args, "--out", "keep.npy", timeout=30)
    lines = [l for l in p.stderr.splitlines() if l.startswith("levattn-mpi:")]
    check(label + ": exit 2", p.returncode == 2, "rc=%d %r" % (p.returncode, p.stderr[-800:]))
    check(label + ": within 10 s", p.seconds < 10, "%.1f s" % p.seconds)
    check(label + ": one message naming %r" % expect, len(lines) == 1 and expect in lines[0], repr(lines))
    with open(path("keep.npy"), "rb") as f:
        check(label + ": the existing output untouched", f.read() == b"existing output")
    check(label + ": no temporary left", not [f for f in os.listdir(WORK) if ".tmp." in f])
    check(label + ": nothing on stdout", p.stdout == "", repr(p.stdout[:200]))


def test_faults():
    K = np.load(path("K.npy"))
    K[-1, 3] = np.nan  # the last row: only the last rank reads it
    save("Knan.npy", K)
    with open(path("K.npy"), "rb") as f:
        data = f.read()
    with open(path("Ktrunc.npy"), "wb") as f:
        f.write(data[:len(data) // 2])
    qkv = lambda k: ["--queries", "Q.npy", "--keys", k, "--values", "V.npy"]
    lev = ["--select", "leverage+eps:0.02"]
    fault("NaN on the last rank", 4, ["attend"] + qkv("Knan.npy") + lev, "rank 3: keys (Knan.npy)")
    fault("NaN on the last rank (ring)", 3, ["attend"] + qkv("Knan.npy") + ["--select", "full"], "rank 2: keys (Knan.npy)")
    fault("truncated key file", 4, ["attend"] + qkv("Ktrunc.npy") + lev, "Ktrunc.npy")
    fault("missing file", 2, ["attend"] + qkv("nothere.npy") + lev, "nothere.npy")
    fault("eps outside (0, 1]", 4, ["attend"] + qkv("K.npy") + ["--select", "leverage+eps:1.5"], "eps")
    save("Vshort.npy", np.load(path("V.npy"))[:-1])
    save("Qwide.npy", np.ones((1001, 17)))
    fault("one value per key", 3, ["attend", "--queries", "Q.npy", "--keys", "K.npy", "--values", "Vshort.npy"] + lev,
          "values (Vshort.npy): expected one row per key")
    fault("queries as wide as keys", 2, ["attend", "--queries", "Qwide.npy", "--keys", "K.npy", "--values", "V.npy"] +
          lev, "queries (Qwide.npy): expected 16 columns")
    fault("full with a window", 2, ["attend"] + qkv("K.npy") + ["--select", "full+window:3"], "window")
    fault("the old spelling of a selection", 2, ["attend"] + qkv("K.npy") + ["--select", "leverage", "--eps", "0.1"],
          "--select leverage+eps")
    fault("unknown selection", 2, ["attend"] + qkv("K.npy") + ["--select", "topk:5"], "select")
    fault("a scale that is not finite", 2, ["attend"] + qkv("K.npy") + lev + ["--scale", "inf"], "scale: expected a finite")
    fault("mismatched stacks", 3, ["attend", "--queries", "Q3.npy", "--keys", "K.npy", "--values", "V.npy"] + lev,
          "leading (batch, heads)")
    fault("universal NaN on the last rank", 4, ["universal", "--keys", "Knan.npy", "--eps", "0.1"], "rank 3: keys")
    fault("heavy NaN on the last rank", 2, ["heavy", "--queries", "Q.npy", "--keys", "Knan.npy", "--eps", "0.1"],
          "rank 1: keys")
    os.makedirs(path("ro"), exist_ok=True)
    p = run_mpi(2, "attend", *qkv("K.npy"), *lev, "--out", "ro/missing/o.npy", timeout=30)
    check("unwritable output: exit 2 with the path", p.returncode == 2 and "ro/missing/o.npy" in p.stderr, p.stderr[-500:])


def rank_processes(launcher_pid):
    """{rank: pid} of the levattn-mpi processes under the launcher (children or grandchildren)."""
    parents, ranks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            if os.path.realpath("/proc/%s/exe" % entry) != MPI_BIN:
                continue
            with open("/proc/%s/environ" % entry, "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            ranks[int(entry)] = int(env.get(b"OMPI_COMM_WORLD_RANK", b"-1"))
        except (OSError, ValueError, IndexError):
            continue

    def under(pid):
        while pid > 1:
            if pid == launcher_pid:
                return True
            pid = parents.get(pid, 0)
        return False

    return {rank: pid for pid, rank in ranks.items() if under(pid)}


def bytes_read(pid):
    """The bytes process `pid` has read (rchar of /proc/PID/io; 0 once it is gone)."""
    try:
        with open("/proc/%d/io" % pid) as f:
            return int(next(l for l in f if l.startswith("rchar:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def killed_rank(label, args, out, reads):
    """mpirun -n 2 levattn-mpi ARGS --out OUT; once both ranks have read `reads` bytes more than
    when they were first seen (their inputs), rank 0 is held (SIGSTOP, so that the run cannot
    finish) and rank 1 killed (SIGKILL), then rank 0 let go."""
    cmd = [MPIEXEC, "-n", "2", "--oversubscribe", MPI_BIN] + args + ["--out", out]
    before = open(path(out), "rb").read() if os.path.exists(path(out)) else None
    p = subprocess.Popen(cmd, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    ranks, deadline = {}, time.time() + 60
    while p.poll() is None and len(ranks) < 2 and time.time() < deadline:
        ranks = rank_processes(p.pid)
    start = {rank: bytes_read(pid) for rank, pid in ranks.items()}
    while p.poll() is None and time.time() < deadline:
        if all(bytes_read(pid) - start[rank] >= reads for rank, pid in ranks.items()):
            break
    if not check(label + ": both ranks started and reading", p.poll() is None and sorted(ranks) == [0, 1],
                 "ranks %r, exit %r" % (ranks, p.poll())):
        p.kill()
        p.communicate()
        return
    os.kill(ranks[0], signal.SIGSTOP)
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.time()
    os.kill(ranks[0], signal.SIGCONT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    seconds = time.time() - t0
    check(label + ": every rank ends within 10 s", seconds < 10 and not rank_processes(p.pid), "%.1f s" % seconds)
    check(label + ": non-zero exit", p.returncode != 0, "rc=%r %r" % (p.returncode, err[-300:]))
    after = open(path(out), "rb").read() if os.path.exists(path(out)) else None
    check(label + ": " + ("the existing output untouched" if before else "no output written"), after == before)
    check(label + ": no temporary left", not [f for f in os.listdir(WORK) if ".tmp." in f])


def test_killed_rank():
    rng = np.random.default_rng(11)
    n, d = 200000, 32
    save("Kbig.npy", keys(rng, n, d))
    save("Qbig.npy", rng.standard_normal((n, d)))
    save("Vbig.npy", rng.standard_normal((n, 8)))
    big = ["--queries", "Qbig.npy", "--keys", "Kbig.npy", "--values", "Vbig.npy"]
    shard = n // 2 * d * 4  # each rank reads at least its half of the keys
    with open(path("kept.npy"), "wb") as f:
        f.write(b"existing output")
    killed_rank("killed rank, attend leverage", ["attend"] + big + ["--select", "leverage+eps:0.01"], "kept.npy", shard)
    killed_rank("killed rank, attend full (the ring)", ["attend"] + big + ["--select", "full"], "ring.npy", shard)
    killed_rank("killed rank, universal", ["universal", "--keys", "Kbig.npy", "--eps", "0.01"], "u.npy", shard)
    for name in ("Kbig.npy", "Qbig.npy", "Vbig.npy"):
        os.remove(path(name))

def main():
    global WORK
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="levattn_mpi_") as d:
        WORK = d
        make_inputs()
        for g in (test_attention, test_two_round, test_universal_and_heavy, test_bytes_do_not_grow_with_n, test_faults,
                  test_killed_rank):
            t0 = time.time()
            group(g)
            print("%-30s %.1f s" % (g.__name__, time.time() - t0), flush=True)
    print("total %.1f s" % (time.time() - start))
    print("%d passed, %d failed" % (PASSED, len(FAILED)))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
