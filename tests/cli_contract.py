#!/usr/bin/env python3
"""The command-line contract of levattn, exercised as a user would.

Usage: python3 tests/cli_contract.py /path/to/levattn

Every number the CLI prints or writes is compared with an independent numpy computation in
float64 (leverage scores from an SVD, heavy entries by brute force, attention densely with an
explicit mask). Error paths are checked for exit code 2, one message on stderr naming the file
or the field, an empty stdout and no crash. Output files must be written atomically.

Under an address-space limit (ulimit -v) below what a run needs, it must exit 1 naming the array
and its bytes (or the working buffer) within a time limit, never crash or hang, and write nothing.

Prints one line per failed check (every check with LEVATTN_CLI_VERBOSE=1) and, at the end, "<passed> passed, <failed> failed"; exits 1
when any check failed. Needs only the standard library and numpy.
"""
import csv
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

if len(sys.argv) != 2:
    sys.stderr.write("usage: cli_contract.py /path/to/levattn\n")
    sys.exit(2)

BIN = os.path.abspath(sys.argv[1])
VERBOSE = os.environ.get("LEVATTN_CLI_VERBOSE") == "1"  # print every check, with its numbers
PASSED = 0
FAILED = []


def check(name, ok, detail=""):
    """Records one check; prints the failures (and the detail) as they happen."""
    global PASSED
    if ok:
        PASSED += 1
        if VERBOSE:
            print("ok:   %s%s" % (name, (": " + detail) if detail else ""), flush=True)
    else:
        FAILED.append(name)
        print("FAIL: %s%s" % (name, (": " + detail) if detail else ""), flush=True)
    return ok


def group(fn):
    """Runs one group of checks; an exception inside it counts as one failed check."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - any error in a group is a failed check, reported
        check(fn.__name__ + " (raised)", False, traceback.format_exc())


def run(*args, timeout=120):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([BIN] + [str(a) for a in args], cwd=WORK, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          universal_newlines=True)


def ok_run(name, *args, timeout=120):
    """Runs a command that must succeed; returns the CompletedProcess or None."""
    p = run(*args, timeout=timeout)
    if not check(name + ": exit 0", p.returncode == 0,
                 "rc=%d, stderr=%r" % (p.returncode, p.stderr[-2000:])):
        return None
    return p


def parse_json(name, text):
    try:
        return json.loads(text)
    except ValueError:
        check(name + ": stdout is one JSON object", False, repr(text[:500]))
        return None


def path(name):
    return os.path.join(WORK, name)


def save(name, a):
    np.save(path(name), np.ascontiguousarray(a, dtype=np.float32))
    return name


def rel_close(a, b, rtol=1e-5):
    """max |a-b| / max(|b|) <= rtol, and the shapes agree."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False, "shape %s != %s" % (a.shape, b.shape)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    err = float(np.max(np.abs(a - b))) / scale if a.size else 0.0
    return err <= rtol, "max relative error %.3e (tolerance %.1e)" % (err, rtol)


# ----------------------------------------------------------------------------------------------
# Independent numpy references (float64).

def np_leverage(K):
    K = np.asarray(K, dtype=np.float64)
    U, s, _ = np.linalg.svd(K, full_matrices=False)
    r = int(np.sum(s > 1e-5 * s[0])) if s.size and s[0] > 0 else 0
    return np.sum(U[:, :r] ** 2, axis=1), r


def np_heavy(Q, K, eps):
    """Brute force: (query, key, value) with A_ij >= eps, and the entries too close to eps to call."""
    S = (np.asarray(Q, np.float64) @ np.asarray(K, np.float64).T) ** 2
    A = S / S.sum(axis=1, keepdims=True)
    sure = A >= eps * (1 + 1e-4)
    unsure = np.abs(A - eps) <= 1e-4 * eps
    return A, sure, unsure


def np_attention(Q, K, V, kernel="softmax", p=2.0, scale=None, mask=None):
    Q = np.asarray(Q, np.float64)
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    if scale is None:
        scale = 1.0 / np.sqrt(Q.shape[1]) if kernel == "softmax" else 1.0
    s = scale * (Q @ K.T)
    if mask is None:
        mask = np.ones(s.shape, dtype=bool)
    if kernel == "softmax":
        s = np.where(mask, s, -np.inf)
        w = np.exp(s - s.max(axis=1, keepdims=True))
    else:
        w = np.where(mask, np.abs(s) ** p, 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    return w @ V


def np_lewis(K, p, iters=200):
    """Lewis weights for p < 4 by the Cohen-Peng iteration w_j <- (k_j^T (K^T W^(1-2/p) K)^-1 k_j)^(p/2),
    i.e. w <- (tau(W^(1/2-1/p) K) w^(2/p-1))^(p/2)."""
    K = np.asarray(K, np.float64)
    w = np.ones(K.shape[0])
    for _ in range(iters):
        tau, _ = np_leverage(K * (w ** (0.5 - 1.0 / p))[:, None])
        w = (tau * w ** (2.0 / p - 1.0)) ** (p / 2)
    return w


def heavy_tailed_keys(rng, n, d, spread=1.5):
    """Gaussian keys with log-normal row norms: a spread of leverage scores, some large."""
    return rng.standard_normal((n, d)) * np.exp(spread * rng.standard_normal(n))[:, None]


# ----------------------------------------------------------------------------------------------

def test_info():
    p = ok_run("info", "info")
    if p:
        check("info mentions BLAS", "BLAS" in p.stdout, repr(p.stdout))
    p = ok_run("info --json", "info", "--json")
    if p:
        j = parse_json("info --json", p.stdout)
        check("info --json has version and blas", j is not None and "version" in j and "blas" in j,
              repr(p.stdout))


def test_planted():
    args = ("planted", "--n", 1024, "--d", 16, "--relevant", 4, "--seed", 3)
    if not ok_run("planted", *args, "--out-dir", "P1"):
        return
    shapes = {}
    for f in ("Q.npy", "K.npy", "V.npy"):
        fp = os.path.join(path("P1"), f)
        shapes[f] = np.load(fp).shape if os.path.exists(fp) else None
    check("planted writes Q.npy K.npy V.npy of shape (1024, 16)",
          all(s == (1024, 16) for s in shapes.values()), repr(shapes))
    if not ok_run("planted (again)", *args, "--out-dir", "P2"):
        return
    same = all(open(os.path.join(path("P1"), f), "rb").read() == open(os.path.join(path("P2"), f), "rb").read()
               for f in ("Q.npy", "K.npy", "V.npy"))
    check("planted: same seed gives identical bytes", same)
    ok_run("planted --seed 4", "planted", "--n", 1024, "--d", 16, "--relevant", 4, "--seed", 4,
           "--out-dir", "P3")
    check("planted: another seed gives other keys",
          not np.array_equal(np.load(path("P1/K.npy")), np.load(path("P3/K.npy"))))


def universal_case(label, kname, eps):
    K = np.load(path(kname))
    tau, rank = np_leverage(K)
    p = ok_run("universal %s --eps %g --json" % (label, eps), "universal", "--keys", kname, "--eps", eps,
               "--json", "--out", "U_" + label + ".npy")
    if not p:
        return None
    j = parse_json("universal", p.stdout)
    if j is None:
        return None
    name = "universal %s --eps %g" % (label, eps)
    fields = ("n", "d", "rank", "size", "indices", "scores")
    if not check(name + ": JSON fields present", all(f in j for f in fields), repr(list(j))):
        return None
    idx = np.asarray(j["indices"], dtype=np.int64)
    sc = np.asarray(j["scores"], dtype=np.float64)
    check(name + ": n, d", j["n"] == K.shape[0] and j["d"] == K.shape[1], "%r %r" % (j["n"], j["d"]))
    check(name + ": rank equals numpy matrix_rank",
          j["rank"] == rank == np.linalg.matrix_rank(K.astype(np.float64)), "%r vs %r" % (j["rank"], rank))
    check(name + ": indices ascending, 0-based, size == len(indices)",
          len(idx) == j["size"] and np.all(np.diff(idx) > 0) and (len(idx) == 0 or (idx[0] >= 0 and idx[-1] < len(K))))
    check(name + ": scores equal numpy leverage scores (1e-4 relative)",
          len(sc) == len(idx) and np.all(np.abs(sc - tau[idx]) <= 1e-4 * tau[idx]),
          "max rel err %.3e" % (np.max(np.abs(sc - tau[idx]) / tau[idx]) if len(idx) else 0))
    clear = np.abs(tau - eps) > 1e-4
    expected = set(np.nonzero((tau >= eps) & clear)[0].tolist())
    got = set(idx.tolist()) - set(np.nonzero(~clear)[0].tolist())
    check(name + ": indices are exactly {j: tau_j >= eps}", got == expected,
          "missing %s, extra %s" % (sorted(expected - got)[:10], sorted(got - expected)[:10]))
    check(name + ": size <= rank / eps", j["size"] <= j["rank"] / eps)
    u = np.load(path("U_" + label + ".npy"))
    check(name + ": --out writes int64 indices equal to JSON",
          u.dtype == np.int64 and np.array_equal(u, idx), "%s %r" % (u.dtype, u[:10]))
    return tau


def test_universal():
    universal_case("planted", "P1/K.npy", 0.1)
    rng = np.random.default_rng(11)
    save("Kht.npy", heavy_tailed_keys(rng, 800, 12))
    tau = universal_case("heavy-tailed", "Kht.npy", 0.05)
    if tau is None:
        return
    check("universal heavy-tailed test data selects several keys", np.sum(tau >= 0.05) >= 5)
    p = ok_run("universal --top-k 5", "universal", "--keys", "Kht.npy", "--top-k", 5, "--json")
    if p:
        j = parse_json("universal --top-k", p.stdout)
        order = np.argsort(-tau, kind="stable")
        check("universal --top-k 5 gives the 5 largest-score keys",
              j is not None and j["indices"] == sorted(order[:5].tolist()) and j["size"] == 5,
              "%r vs %r" % (j and j.get("indices"), sorted(order[:5].tolist())))
    # ridge: scores k_j^T (K^T K + lambda I)^-1 k_j
    K = np.load(path("Kht.npy")).astype(np.float64)
    lam = 10.0
    ridge_tau = np.einsum("ij,jk,ik->i", K, np.linalg.inv(K.T @ K + lam * np.eye(K.shape[1])), K)
    p = ok_run("universal --ridge", "universal", "--keys", "Kht.npy", "--top-k", 20, "--ridge", lam, "--json")
    if p:
        j = parse_json("universal --ridge", p.stdout)
        idx = np.asarray(j["indices"])
        check("universal --ridge 10: scores equal numpy ridge leverage scores",
              np.allclose(j["scores"], ridge_tau[idx], rtol=1e-4, atol=0)
              and sorted(np.argsort(-ridge_tau, kind="stable")[:20].tolist()) == idx.tolist())
    p = ok_run("universal (text)", "universal", "--keys", "Kht.npy", "--eps", 0.05)
    if p:
        check("universal without --json prints a summary naming rank", "rank" in p.stdout, repr(p.stdout))


def read_csv(name, headed):
    with open(path(name), newline="") as f:
        rows = list(csv.reader(f))
    return rows


def heavy_compare(name, rows, Q, K, eps, offset=0):
    """rows: list of (query, key, value) for one head."""
    A, sure, unsure = np_heavy(Q, K, eps)
    got = {(q, k) for q, k, _ in rows}
    exp = set(zip(*np.nonzero(sure)))
    exp = {(int(a), int(b)) for a, b in exp}
    amb = {(int(a), int(b)) for a, b in zip(*np.nonzero(unsure))}
    check(name + ": same (query, key) set as numpy brute force", (got - amb) == (exp - amb),
          "missing %s extra %s" % (sorted(exp - got - amb)[:5], sorted(got - exp - amb)[:5]))
    vals_ok = all(abs(v - A[q, k]) <= 1e-4 * A[q, k] for q, k, v in rows)
    check(name + ": values within 1e-4 relative of numpy", vals_ok)
    keys = [(q, k) for q, k, _ in rows]
    check(name + ": sorted by query then key, no duplicates",
          keys == sorted(keys) and len(set(keys)) == len(keys))
    return len(exp)


def test_heavy():
    rng = np.random.default_rng(5)
    m, n, d, eps = 300, 500, 8, 0.05
    Q = rng.standard_normal((m, d)).astype(np.float32)
    K = heavy_tailed_keys(rng, n, d).astype(np.float32)
    save("Qh.npy", Q)
    save("Kh.npy", K)
    if ok_run("heavy --out H.csv", "heavy", "--queries", "Qh.npy", "--keys", "Kh.npy", "--eps", eps,
              "--out", "H.csv"):
        rows = read_csv("H.csv", False)
        check("heavy CSV header is query,key,value", rows and rows[0] == ["query", "key", "value"],
              repr(rows[:1]))
        body = [(int(r[0]), int(r[1]), float(r[2])) for r in rows[1:]]
        nexp = heavy_compare("heavy 2-D", body, Q, K, eps)
        check("heavy test data has heavy entries", nexp >= 20, str(nexp))
        if ok_run("heavy --out H.npz", "heavy", "--queries", "Qh.npy", "--keys", "Kh.npy", "--eps", eps,
                  "--out", "H.npz"):
            z = np.load(path("H.npz"))
            good = {"query", "key", "value"} <= set(z.files)
            good = good and np.array_equal(z["query"], [r[0] for r in body]) \
                and np.array_equal(z["key"], [r[1] for r in body]) \
                and np.allclose(z["value"], [r[2] for r in body], rtol=1e-7, atol=0)
            check("heavy --out H.npz: query/key/value equal the CSV", good, repr(z.files))
        p = ok_run("heavy (CSV on stdout)", "heavy", "--queries", "Qh.npy", "--keys", "Kh.npy", "--eps", eps)
        if p:
            check("heavy without --out prints the same CSV on stdout",
                  p.stdout == open(path("H.csv")).read())
        p = ok_run("heavy --json", "heavy", "--queries", "Qh.npy", "--keys", "Kh.npy", "--eps", eps,
                   "--out", "H2.csv", "--json")
        if p:
            j = parse_json("heavy --json", p.stdout)
            tau, _ = np_leverage(K)
            check("heavy --json: count equals the number of rows, universal_size present",
                  j is not None and j.get("count") == len(body) and "universal_size" in j
                  and len(read_csv("H2.csv", False)) - 1 == len(body), repr(j))
            check("heavy --json: universal_size is |{tau_j >= eps}|",
                  j is not None and abs(j.get("universal_size", -1) - int(np.sum(tau >= eps))) <= int(np.sum(np.abs(tau - eps) <= 1e-4)),
                  "%r vs %d" % (j and j.get("universal_size"), int(np.sum(tau >= eps))))
        # The countsketch search: the same entries (a fixed seed makes the run deterministic),
        # a JSON summary of the sketch, and a clear refusal where it does not apply.
        p = ok_run("heavy --search countsketch", "heavy", "--queries", "Qh.npy", "--keys", "Kh.npy", "--eps", eps,
                   "--search", "countsketch", "--delta", 0.05, "--seed", 3, "--out", "Hs.csv", "--json")
        if p:
            j = parse_json("heavy --search countsketch --json", p.stdout)
            rows_s = [(int(r[0]), int(r[1]), float(r[2])) for r in read_csv("Hs.csv", False)[1:]]
            heavy_compare("heavy --search countsketch", rows_s, Q, K, eps)
            check("heavy --search countsketch --json: search, sketch size and candidates",
                  j is not None and j.get("search") == "countsketch" and j.get("sketch_buckets") == 1280
                  and j.get("sketch_rows", 0) >= 1 and j.get("candidates", -1) >= len(rows_s), repr(j))
        p = run("heavy", "--queries", "Qh.npy", "--keys", "Kh.npy", "--eps", eps, "--search", "countsketch",
                "--p", 3)
        check("heavy --search countsketch --p 3: exit 2 naming the option",
              p.returncode == 2 and "search countsketch" in p.stderr, "rc=%d %r" % (p.returncode, p.stderr))
    # 3-D input: (heads, m, d)
    Q3 = rng.standard_normal((2, 150, d)).astype(np.float32)
    K3 = np.stack([heavy_tailed_keys(rng, 250, d) for _ in range(2)]).astype(np.float32)
    save("Q3h.npy", Q3)
    save("K3h.npy", K3)
    if ok_run("heavy 3-D", "heavy", "--queries", "Q3h.npy", "--keys", "K3h.npy", "--eps", eps, "--out", "H3.csv"):
        rows = read_csv("H3.csv", True)
        check("heavy 3-D CSV header is head,query,key,value",
              rows and rows[0] == ["head", "query", "key", "value"], repr(rows[:1]))
        body = [(int(r[0]), int(r[1]), int(r[2]), float(r[3])) for r in rows[1:]]
        check("heavy 3-D rows sorted by head", [r[0] for r in body] == sorted(r[0] for r in body)
              and set(r[0] for r in body) <= {0, 1})
        for h in range(2):
            heavy_compare("heavy 3-D head %d" % h, [r[1:] for r in body if r[0] == h], Q3[h], K3[h], eps)
        if ok_run("heavy 3-D npz", "heavy", "--queries", "Q3h.npy", "--keys", "K3h.npy", "--eps", eps,
                  "--out", "H3.npz"):
            z = np.load(path("H3.npz"))
            check("heavy 3-D npz has head/query/key/value equal to the CSV",
                  {"head", "query", "key", "value"} <= set(z.files)
                  and np.array_equal(z["head"], [r[0] for r in body])
                  and np.array_equal(z["query"], [r[1] for r in body])
                  and np.array_equal(z["key"], [r[2] for r in body]), repr(z.files))


def attend(name, out, *extra, q="Qa.npy", k="Ka.npy", v="Va.npy"):
    p = ok_run(name, "attend", "--queries", q, "--keys", k, "--values", v, "--out", out, *extra)
    if not p:
        return None, None
    return np.load(path(out)), p


def test_attend():
    rng = np.random.default_rng(7)
    m, n, d, dv = 200, 300, 16, 12
    Q = rng.standard_normal((m, d)).astype(np.float32)
    K = heavy_tailed_keys(rng, n, d, spread=0.7).astype(np.float32)
    V = rng.standard_normal((n, dv)).astype(np.float32)
    save("Qa.npy", Q)
    save("Ka.npy", K)
    save("Va.npy", V)
    I = np.arange(m)[:, None]
    J = np.arange(n)[None, :]

    O, _ = attend("attend full", "O_full.npy")
    if O is not None:
        check("attend writes float32 (m, dv)", O.dtype == np.float32 and O.shape == (m, dv), "%s %s" % (O.dtype, O.shape))
        good, det = rel_close(O, np_attention(Q, K, V))
        check("attend full softmax equals numpy (1e-5)", good, det)
    O, _ = attend("attend softmax --scale 0.3", "O_scale.npy", "--scale", 0.3)
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, scale=0.3))
        check("attend softmax --scale 0.3 equals numpy (1e-5)", good, det)
    O, _ = attend("attend poly p=2", "O_poly.npy", "--select", "full+kernel:poly+p:2")
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, kernel="poly", p=2.0))
        check("attend poly p=2 equals numpy |s|^2 normalised (1e-5)", good, det)
    O, _ = attend("attend poly p=3 scale 0.5", "O_poly3.npy", "--select", "full+kernel:poly+p:3", "--scale", 0.5)
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, kernel="poly", p=3.0, scale=0.5))
        check("attend poly p=3 --scale 0.5 equals numpy (1e-5)", good, det)

    # leverage top-16 + window 2 + sinks 1
    tau, _ = np_leverage(K)
    order = np.argsort(-tau, kind="stable")
    check("attend test data: 16th and 17th leverage scores are distinguishable",
          tau[order[15]] - tau[order[16]] > 1e-4 * tau[order[15]])
    top = np.zeros(n, dtype=bool)
    top[order[:16]] = True
    mask = top[None, :] | (np.abs(I - J) <= 2) | (J < 1)
    O, p = attend("attend leverage", "O_lev.npy", "--select", "leverage:16+window:2+sinks:1", "--json")
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, mask=mask))
        check("attend leverage top-16 + window 2 + sinks 1 equals masked numpy (1e-5)", good, det)
        j = parse_json("attend --json", p.stdout)
        if j is not None:
            shared = int(np.sum(top | (np.arange(n) < 1)))
            check("attend --json: shared_sizes is |top-16 U sinks|",
                  j.get("shared_sizes") == [shared], "%r vs %d" % (j.get("shared_sizes"), shared))
            check("attend --json: mean_keys_per_query is the mean selection size",
                  abs(j.get("mean_keys_per_query", -1) - mask.sum(axis=1).mean()) <= 1e-6 * mask.sum(axis=1).mean(),
                  "%r vs %r" % (j.get("mean_keys_per_query"), mask.sum(axis=1).mean()))
            secs = j.get("seconds", {})
            check("attend --json: timings present and non-negative",
                  isinstance(secs, dict) and all(isinstance(secs.get(f), (int, float)) and secs[f] >= 0
                                                 for f in ("selection", "attention", "total")), repr(secs))
            check("attend --json: shape", j.get("shape") == [m, dv], repr(j.get("shape")))

    # leverage by threshold: U_eps
    eps = float(np.sort(tau)[-10] - 1e-3)
    if np.min(np.abs(tau - eps)) > 1e-4:
        O, _ = attend("attend leverage --eps", "O_leveps.npy", "--select", "leverage+eps:%r" % eps)
        if O is not None:
            good, det = rel_close(O, np_attention(Q, K, V, mask=np.broadcast_to(tau >= eps, (m, n))))
            check("attend leverage --eps equals numpy over {tau_j >= eps} (1e-5)", good, det)

    # per-query exact top-8
    s = Q.astype(np.float64) @ K.astype(np.float64).T
    srt = np.sort(s, axis=1)[:, ::-1]
    clear_rows = (srt[:, 7] - srt[:, 8]) > 1e-4 * np.abs(srt[:, 7]).clip(min=1)
    kth = srt[:, 7:8]
    O, _ = attend("attend topk", "O_topk.npy", "--select", "topk:8")
    if O is not None:
        ref = np_attention(Q, K, V, mask=s >= kth)
        good, det = rel_close(O[clear_rows], ref[clear_rows])
        check("attend topk 8 equals numpy per-row top-8 masked softmax (1e-5)",
              good and clear_rows.sum() > m * 0.9, det + ", %d clear rows" % clear_rows.sum())

    O, _ = attend("attend window", "O_win.npy", "--select", "window:3")
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, mask=np.abs(I - J) <= 3))
        check("attend window 3 equals banded numpy (1e-5)", good, det)
    O, _ = attend("attend window + sinks", "O_winsink.npy", "--select", "window:1+sinks:4")
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, mask=(np.abs(I - J) <= 1) | (J < 4)))
        check("attend window 1 + sinks 4 equals numpy (1e-5)", good, det)

    O1, p1 = attend("attend random seed 5", "O_r1.npy", "--select", "random:32+seed:5", "--json")
    O2, _ = attend("attend random seed 5 (again)", "O_r2.npy", "--select", "random:32+seed:5")
    O3, _ = attend("attend random seed 6", "O_r3.npy", "--select", "random:32+seed:6")
    if O1 is not None and O2 is not None and O3 is not None:
        check("attend random: same seed gives identical output",
              open(path("O_r1.npy"), "rb").read() == open(path("O_r2.npy"), "rb").read())
        check("attend random: another seed gives another output", not np.array_equal(O1, O3))
        j = parse_json("attend random --json", p1.stdout)
        check("attend random --json: 32 shared keys", j is not None and j.get("shared_sizes") == [32],
              repr(j and j.get("shared_sizes")))

    # 3-D and 4-D inputs: every head equals the 2-D run on that head
    for shape_prefix in ((2,), (2, 2)):
        tag = "%d-D" % (len(shape_prefix) + 2)
        mh, nh = 64, 96
        Qh = rng.standard_normal(shape_prefix + (mh, d)).astype(np.float32)
        Kh = (rng.standard_normal(shape_prefix + (nh, d))
              * np.exp(0.7 * rng.standard_normal(shape_prefix + (nh, 1)))).astype(np.float32)
        Vh = rng.standard_normal(shape_prefix + (nh, dv)).astype(np.float32)
        save("Q%s.npy" % tag, Qh)
        save("K%s.npy" % tag, Kh)
        save("V%s.npy" % tag, Vh)
        opts = ("--select", "leverage:8+window:1")
        O, _ = attend("attend " + tag, "O%s.npy" % tag, *opts,
                      q="Q%s.npy" % tag, k="K%s.npy" % tag, v="V%s.npy" % tag)
        if O is None:
            continue
        if not check("attend %s output shape (..., m, dv)" % tag, O.shape == shape_prefix + (mh, dv), str(O.shape)):
            continue
        all_ok, dets = True, []
        for hidx in np.ndindex(*shape_prefix):
            save("q1.npy", Qh[hidx])
            save("k1.npy", Kh[hidx])
            save("v1.npy", Vh[hidx])
            O1h, _ = attend("attend %s head %s as 2-D" % (tag, hidx), "o1.npy", *opts,
                            q="q1.npy", k="k1.npy", v="v1.npy")
            if O1h is None:
                all_ok = False
                continue
            good, det = rel_close(O[hidx], O1h, 1e-6)
            all_ok = all_ok and good
            dets.append(det)
        check("attend %s: every head equals the 2-D run on that head" % tag, all_ok, "; ".join(dets))


def test_power_and_sketch():
    """--p on universal / heavy / attend against numpy; --method sketch and sampled normalisers."""
    rng = np.random.default_rng(17)
    K = heavy_tailed_keys(rng, 400, 5)
    Q = rng.standard_normal((120, 5))
    V = rng.standard_normal((400, 3))
    save("Kp.npy", K)
    save("Qp.npy", Q)
    save("Vp.npy", V)
    p = 3.0
    w = np_lewis(K, p)
    t = np.minimum(1.0, 5 ** (p / 2 - 1) * w)
    r = ok_run("universal --p 3", "universal", "--keys", "Kp.npy", "--eps", 0.05, "--p", p, "--json")
    if r:
        j = parse_json("universal --p 3", r.stdout)
        idx = np.asarray(j["indices"], dtype=np.int64)
        clear = np.abs(t - 0.05) > 1e-4
        check("universal --p 3: indices are {t_j >= eps} for the Lewis-weight bounds",
              set(idx[clear[idx]]) == set(np.nonzero((t >= 0.05) & clear)[0]))
        check("universal --p 3: scores are 5^(p/2-1) w_j", rel_close(np.asarray(j["scores"]), t[idx], 1e-5))
        check("universal --p 3: p and the |U| bound reported", j["p"] == 3.0 and j["bound"] == np.floor(5 ** 1.5 / 0.05))
    # heavy --p 3, exact normaliser, against brute force.
    r = ok_run("heavy --p 3", "heavy", "--queries", "Qp.npy", "--keys", "Kp.npy", "--eps", 0.1, "--p", p,
               "--out", "Hp.csv")
    rs = ok_run("heavy --p 3 --json", "heavy", "--queries", "Qp.npy", "--keys", "Kp.npy", "--eps", 0.1, "--p", p, "--json")
    if r and rs:
        S = np.abs(Q @ K.T) ** p
        A = S / S.sum(axis=1, keepdims=True)
        rows = read_csv("Hp.csv", False)[1:]
        got = {(int(a), int(b)): float(c) for a, b, c in rows}
        want = {(int(i), int(j)) for i, j in zip(*np.nonzero(A >= 0.1 * (1 + 1e-5)))}
        check("heavy --p 3: every brute-force heavy entry found", want <= set(got))
        check("heavy --p 3: every entry is heavy", all(A[i, j] >= 0.1 * (1 - 1e-5) for (i, j) in got))
        check("heavy --p 3: values", all(abs(got[k] - A[k]) <= 1e-4 * A[k] for k in want))
        j = parse_json("heavy --p 3 --json", rs.stdout)
        check("heavy --p 3 --json: normaliser named", j.get("normaliser") == "exact (all keys)", str(j))
    # Sampled normaliser on a larger key set: reported as such with gamma, every heavy entry found.
    Kb = np.concatenate([0.3 * rng.standard_normal((20000, 4)), 6 * np.eye(4)])
    save("Ks.npy", Kb)
    save("Qs.npy", rng.standard_normal((100, 4)))
    r = ok_run("heavy sampled", "heavy", "--queries", "Qs.npy", "--keys", "Ks.npy", "--eps", 0.05, "--p", 3,
               "--normaliser", "sampled", "--gamma", 0.3, "--seed", 4, "--json")
    if r:
        j = parse_json("heavy sampled", r.stdout)
        check("heavy sampled: normaliser, samples and gamma reported",
              j.get("normaliser") == "sampled" and 0 < j.get("samples", 0) < 20004 and 0 < j.get("gamma", 9) <= 0.3, str(j))
    # attend --kernel poly --p 3 --select leverage --eps: over the p-universal set.
    r = ok_run("attend poly p=3 leverage eps", "attend", "--queries", "Qp.npy", "--keys", "Kp.npy", "--values", "Vp.npy",
               "--out", "Op.npy", "--select", "leverage+eps:0.05+kernel:poly+p:%r" % p, "--json")
    if r:
        sel = (t >= 0.05 / (1 + 0.0))
        ref = np_attention(Q, K, V, kernel="poly", p=p, mask=np.broadcast_to(sel, (120, 400)))
        check("attend poly p=3 leverage eps: output over the p-universal set",
              rel_close(np.load(path("Op.npy")), ref, 1e-5))
    # --method sketch: a superset of the exact universal set, with the sketch described.
    Kl = heavy_tailed_keys(rng, 30000, 6)
    save("Kl.npy", Kl)
    tau, rank = np_leverage(Kl)
    for kind in ("countsketch", "srht", "gaussian"):
        r = ok_run("universal --method sketch --sketch " + kind, "universal", "--keys", "Kl.npy", "--eps", 0.01,
                   "--method", "sketch", "--sketch", kind, "--seed", 2, "--json")
        if not r:
            continue
        j = parse_json("sketch " + kind, r.stdout)
        idx = set(j["indices"])
        check("sketch %s: method, sketch size and gamma reported" % kind,
              j.get("method") == "sketch" and 0 < j.get("sketch_size", 0) < 30000 and 0 < j.get("gamma", 9) < 1, str(j)[:300])
        check("sketch %s: superset of the exact universal set" % kind, set(np.nonzero(tau >= 0.01)[0]) <= idx)
        sc = np.asarray(j["scores"])
        ii = np.asarray(j["indices"], dtype=np.int64)
        ratio = sc / tau[ii]
        check("sketch %s: scores within the stated gamma" % kind,
              np.all(ratio <= 1 + j["gamma"]) and np.all(ratio >= 1 / (1 + j["gamma"])), "ratio range %s..%s" % (ratio.min(), ratio.max()))
    r = ok_run("attend --method sketch", "attend", "--queries", "Qp.npy", "--keys", "Kp.npy", "--values", "Vp.npy",
               "--out", "Osk.npy", "--select", "leverage:16+method:sketch", "--json")
    check("attend --method sketch: runs (n below the sketch size falls back to exact scores)", r is not None)
    bad("universal --method sketch --p 3", ("universal", "--keys", "Kp.npy", "--eps", 0.1, "--p", 3, "--method", "sketch"),
        ("sketch", "p"))
    bad("heavy --gamma 1.5 sampled", ("heavy", "--queries", "Qp.npy", "--keys", "Kp.npy", "--eps", 0.1, "--p", 3,
                                      "--normaliser", "sampled", "--gamma", 1.5), ("gamma",))
    bad("universal --p 0", ("universal", "--keys", "Kp.npy", "--eps", 0.1, "--p", 0), ("p",))
    bad("heavy --p -1", ("heavy", "--queries", "Qp.npy", "--keys", "Kp.npy", "--eps", 0.1, "--p", -1), ("p",))
    bad("attend --budget 2,1.5", ("attend", "--queries", "Qp.npy", "--keys", "Kp.npy", "--values", "Vp.npy",
                                  "--out", "Ob.npy", "--select", "topk+budget_alpha:2+budget_exponent:1.5"), ("budget",))
    r = ok_run("attend --budget", "attend", "--queries", "Qp.npy", "--keys", "Kp.npy", "--values", "Vp.npy",
               "--out", "Obud.npy", "--select", "topk+budget_alpha:1+budget_exponent:0.5", "--json")
    if r:
        check("attend --budget 1,0.5: k = ceil(sqrt(400)) = 20", parse_json("budget", r.stdout).get("top_k") == 20)


def np_softmax_gram_error(X, Y):
    def attn(Z):
        G = Z @ Z.T
        E = np.exp(G - G.max(axis=1, keepdims=True))
        return E / E.sum(axis=1, keepdims=True)
    return np.abs(attn(np.asarray(Y, np.float64)) - attn(np.asarray(X, np.float64))).max()


def test_reduce():
    rng = np.random.default_rng(23)
    n, d, r = 48, 2048, 0.05
    X = rng.standard_normal((n, d)) * (r / 2) / np.sqrt(d)
    save("X.npy", X)
    G = X @ X.T
    check("reduce premise: |<x_i,x_j>| < r", np.abs(G).max() < r)
    for method in ("gaussian", "srht", "countsketch", "svd", "bss"):
        res = ok_run("reduce " + method, "reduce", "--x", "X.npy", "--method", method, "--out", "Y_%s.npy" % method,
                     "--seed", 3, "--json")
        if not res:
            continue
        j = parse_json("reduce " + method, res.stdout)
        Y = np.load(path("Y_%s.npy" % method))
        check("reduce %s: Y is n x m with m reported" % method, Y.shape == (n, j["m"]) and 1 <= j["m"] <= d, str(Y.shape))
        err = np_softmax_gram_error(X, Y)
        check("reduce %s: reported error equals numpy's" % method, abs(j["error"] - err) <= 1e-6 + 1e-3 * err,
              "%g vs %g" % (j["error"], err))
        check("reduce %s: error O(r)" % method, err <= r)
        if method == "svd":
            check("reduce svd: Y Y^T = X X^T", np.abs(Y.astype(np.float64) @ Y.T - G).max() <= 1e-6 * np.abs(G).max() + 1e-9)
    res = ok_run("reduce --m 100", "reduce", "--x", "X.npy", "--method", "gaussian", "--m", 100, "--out", "Y100.npy")
    if res:
        check("reduce --m 100: 100 columns", np.load(path("Y100.npy")).shape == (n, 100))
    bad("reduce --m 0 is the default, --m -1 is not", ("reduce", "--x", "X.npy", "--method", "svd", "--m", -1,
                                                       "--out", "Yb.npy"), ("m",))
    bad("reduce --m 0", ("reduce", "--x", "X.npy", "--method", "gaussian", "--m", 0, "--out", "Yb.npy"), ("--m",))
    bad("reduce --m > d", ("reduce", "--x", "X.npy", "--method", "gaussian", "--m", d + 1, "--out", "Yb.npy"), ("m",))
    bad("reduce unknown method", ("reduce", "--x", "X.npy", "--method", "pca", "--out", "Yb.npy"), ("method",))
    Xn = X.copy()
    Xn[3, 5] = np.nan
    save("Xn.npy", Xn)
    bad("reduce NaN", ("reduce", "--x", "Xn.npy", "--method", "svd", "--out", "Yb.npy"), ("Xn.npy",))


def test_bench():
    p = ok_run("bench", "bench", "--n", 2048, "--d", 32, "--top-k", 64, "--repeats", 1, "--json", timeout=60)
    if not p:
        return
    j = parse_json("bench --json", p.stdout)
    if j is None:
        return
    check("bench --json: n, d, heads, top_k",
          j.get("n") == 2048 and j.get("d") == 32 and j.get("heads") == 1 and j.get("top_k") == 64, repr(j))
    secs = j.get("seconds", {})
    need = ("leverage_scores", "levattention_forward", "dense_forward", "gemm_ktk")
    check("bench --json: positive seconds of leverage scores, LevAttention, dense, GEMM K^T K",
          isinstance(secs, dict) and all(isinstance(secs.get(f), (int, float)) and secs[f] > 0 for f in need),
          repr(secs))
    rates = ("speedup", "dense_gemm_efficiency", "levattention_gflops", "levattention_gemm_efficiency")
    check("bench --json: speedup and the rates are positive numbers",
          all(isinstance(j.get(f), (int, float)) and j[f] > 0 for f in rates), repr({f: j.get(f) for f in rates}))
    if isinstance(secs, dict) and secs.get("levattention_forward", 0) > 0 and j.get("sgemm_gflops", 0) > 0:
        work = 4 * 2048 * 64 * 32 + 2 * 2048 * 32 * 32  # 4 n k d + 2 n d^2
        check("bench --json: levattention_gflops = (4 n k d + 2 n d^2) / time, its efficiency over the SGEMM rate",
              abs(j["levattention_gflops"] - work / secs["levattention_forward"] * 1e-9) <= 1e-6 * j["levattention_gflops"]
              and abs(j["levattention_gemm_efficiency"] - j["levattention_gflops"] / j["sgemm_gflops"]) <= 1e-9)
    if isinstance(secs, dict) and all(secs.get(f, 0) > 0 for f in need):
        check("bench --json: speedup = dense / LevAttention",
              abs(j["speedup"] - secs["dense_forward"] / secs["levattention_forward"]) <= 1e-6 * j["speedup"])


def test_demo():
    p = ok_run("demo", "demo", "--n", 4096, "--json", timeout=60)
    if not p:
        return
    j = parse_json("demo --json", p.stdout)
    if j is None:
        return
    h = j.get("heavy", {})
    check("demo --json: heavy recall 1.0 and precision 1.0",
          h.get("recall") == 1.0 and h.get("precision") == 1.0, repr(h))
    check("demo --json: universal set contains the planted keys",
          j.get("universal", {}).get("contains_planted") is True, repr(j.get("universal")))
    check("demo --json: LevAttention heavy recall 1.0",
          j.get("attention", {}).get("heavy_recall") == 1.0, repr(j.get("attention")))


def bad(name, args, must_name=(), rc=2):
    """A failing command: exit code rc, one message on stderr naming every string in must_name."""
    p = run(*args)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    err = p.stderr.lower()
    problems = []
    if p.returncode != rc:
        problems.append("exit code %d, expected %d" % (p.returncode, rc))
    if p.returncode < 0:
        problems.append("killed by signal %d" % -p.returncode)
    if p.stdout.strip():
        problems.append("stdout not empty: %r" % p.stdout[:300])
    if len(lines) != 1:
        problems.append("expected one message line on stderr, got %d" % len(lines))
    for bad_word in ("traceback", "terminate called", "abort", "segmentation", "what():"):
        if bad_word in err:
            problems.append("stderr contains %r" % bad_word)
    for s in must_name:
        # An option may be named by its flag (--top-k) or by the library's field (top_k).
        if s.lower() not in err and s.lower().replace("-", "_") not in err:
            problems.append("stderr does not name %r" % s)
    check("bad input: " + name, not problems, "; ".join(problems) + " | stderr=%r" % p.stderr[:400])


def test_hardening():
    """Defects that must stay fixed: independent random streams, sizes that overflow, float-to-int
    conversions, refused sketches, outputs written as one set, flag ranges, --inputs and
    --save-selection, stacks of key matrices for universal."""
    # Random selection draws from its own streams: with the same seed it must not reproduce the
    # planted positions (an earlier version selected exactly the 8 planted keys in head 2).
    if ok_run("planted for streams", "planted", "--n", 1024, "--d", 16, "--relevant", 8, "--seed", 3,
              "--out-dir", "PS"):
        rel = set(np.load(path("PS/relevant.npy")).tolist())
        for name in ("Q", "K", "V"):
            a = np.load(path("PS/%s.npy" % name))
            np.save(path("PS/%s3.npy" % name), np.stack([a, a, a]))
        if ok_run("attend random on the planted stack", "attend", "--queries", "PS/Q3.npy", "--keys", "PS/K3.npy",
                  "--values", "PS/V3.npy", "--out", "PS/O3.npy", "--select", "random:8+seed:3",
                  "--save-selection", "PS/S3.npz"):
            z = np.load(path("PS/S3.npz"))
            off, keys = z["shared_offsets"], z["shared_keys"]
            overlaps = [len(rel & set(keys[off[h]:off[h + 1]].tolist())) for h in range(3)]
            check("random selection is independent of the planted positions (seed 3, 3 heads)",
                  max(overlaps) <= 2 and len(off) == 4, "overlaps %r" % overlaps)
    # Sizes whose products overflow, or that no memory holds: exit 2 naming the bytes.
    bad("planted 2^32 x 2^32", ("planted", "--n", 4294967296, "--d", 4294967296, "--out-dir", "Pbig"), ("planted", "bytes"))
    bad("planted 3e9 x 1e9", ("planted", "--n", 3000000000, "--d", 1000000000, "--out-dir", "Pbig"), ("bytes",))
    bad("bench 2^32 x 2^32", ("bench", "--n", 4294967296, "--d", 4294967296), ("bench", "bytes"))
    check("oversized commands wrote nothing", not os.path.exists(path("Pbig")))
    # |U| bound of a tiny eps: a large positive number, not a wrapped integer.
    rng = np.random.default_rng(21)
    save("Kt.npy", rng.standard_normal((300, 8)))
    p = ok_run("universal --eps 1e-300", "universal", "--keys", "Kt.npy", "--eps", 1e-300, "--json")
    if p:
        j = parse_json("universal --eps 1e-300", p.stdout)
        check("universal --eps 1e-300: bound is min(n, ...) and positive", j is not None and j["bound"] == 300,
              repr(j and j["bound"]))
    p = ok_run("universal --eps 1e-300 (text)", "universal", "--keys", "Kt.npy", "--eps", 1e-300)
    if p:
        import re
        m = re.search(r"at most ([^)]+)\)", p.stdout)
        check("universal --eps 1e-300 text: the bound printed is n, not a wrapped integer",
              m is not None and float(m.group(1)) == 300, p.stdout)
    # A sketch with fewer rows than d cannot embed range(K).
    save("K64.npy", rng.standard_normal((5000, 64)))
    bad("universal --method sketch --sketch-size 10 at d = 64",
        ("universal", "--keys", "K64.npy", "--eps", 0.1, "--method", "sketch", "--sketch-size", 10),
        ("sketch_size", "64"))
    bad("heavy --method sketch (exact normalisers)",
        ("heavy", "--queries", "Kt.npy", "--keys", "Kt.npy", "--eps", 0.1, "--method", "sketch"), ("sketch",))
    # Flags outside their ranges.
    att = ("attend", "--queries", "Kt.npy", "--keys", "Kt.npy", "--values", "Kt.npy", "--out", "Ot.npy")
    bad("seed -1", att + ("--select", "random:3+seed:-1"), ("seed",))
    bad("--scale nan", att + ("--scale", "nan"), ("scale",))
    bad("--scale inf", att + ("--scale", "inf"), ("scale",))
    p = ok_run("attend random:500 (above n)", *att, "--select", "random:500", "--json")
    if p:
        j = parse_json("attend --top-k 500", p.stdout)
        check("attend --top-k above n: every key, and a note on stderr",
              j is not None and j["top_k"] == 300 and j["shared_sizes"] == [300] and "every key" in p.stderr,
              "%r %r" % (j and j.get("top_k"), p.stderr))
    p = ok_run("attend --scale 0", *att, "--scale", 0)
    if p:
        K = np.load(path("Kt.npy")).astype(np.float64)
        good, det = rel_close(np.load(path("Ot.npy")), np.broadcast_to(K.mean(axis=0), K.shape))
        check("attend --scale 0 weighs every key equally", good, det)
    # planted writes its four files as one set: a failure at the last leaves the old three.
    os.makedirs(path("PSet/relevant.npy"))
    for name in ("Q", "K", "V"):
        with open(path("PSet/%s.npy" % name), "wb") as f:
            f.write(b"old " + name.encode())
    bad("planted with relevant.npy a directory", ("planted", "--n", 64, "--d", 8, "--out-dir", "PSet"),
        ("relevant.npy",))
    check("planted failure left Q, K, V as they were",
          all(open(path("PSet/%s.npy" % n), "rb").read() == b"old " + n.encode() for n in ("Q", "K", "V"))
          and sorted(os.listdir(path("PSet"))) == ["K.npy", "Q.npy", "V.npy", "relevant.npy"],
          repr(sorted(os.listdir(path("PSet")))))
    # A write that fails midway (file size limit) leaves the old output and no temporary file.
    import resource
    import signal
    sub = path("fsize")
    os.mkdir(sub)
    with open(os.path.join(sub, "O.npy"), "wb") as f:
        f.write(b"old output")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    Kl = rng.standard_normal((2000, 8)).astype(np.float32)
    save("fsize/K.npy", Kl)  # 64 KB: readable, but an output of this size cannot be written
    pr = subprocess.run([BIN, "attend", "--queries", "fsize/K.npy", "--keys", "fsize/K.npy", "--values", "fsize/K.npy",
                         "--out", "fsize/O.npy"], cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        universal_newlines=True, preexec_fn=limit, timeout=120)
    check("write failing midway: exit 2 naming the file", pr.returncode == 2 and "O.npy" in pr.stderr,
          "rc=%d %r" % (pr.returncode, pr.stderr))
    check("write failing midway: old output kept, no temporary left",
          open(os.path.join(sub, "O.npy"), "rb").read() == b"old output" and sorted(os.listdir(sub)) == ["K.npy", "O.npy"],
          repr(sorted(os.listdir(sub))))
    # --inputs qkv.npz equals the separate files.
    Q = rng.standard_normal((2, 40, 8)).astype(np.float32)
    K = (rng.standard_normal((2, 70, 8)) * np.exp(rng.standard_normal((2, 70, 1)))).astype(np.float32)
    V = rng.standard_normal((2, 70, 5)).astype(np.float32)
    for n_, a in (("Qi", Q), ("Ki", K), ("Vi", V)):
        save(n_ + ".npy", a)
    np.savez(path("qkv.npz"), q=Q, k=K, v=V)
    sel = ("--select", "leverage:6+window:1")
    if ok_run("attend --inputs", "attend", "--inputs", "qkv.npz", "--out", "Oi1.npy", *sel) and \
            ok_run("attend separate files", "attend", "--queries", "Qi.npy", "--keys", "Ki.npy", "--values", "Vi.npy",
                   "--out", "Oi2.npy", *sel):
        check("attend --inputs qkv.npz gives the same bytes as separate files",
              open(path("Oi1.npy"), "rb").read() == open(path("Oi2.npy"), "rb").read())
    p1 = ok_run("heavy --inputs", "heavy", "--inputs", "qkv.npz", "--eps", 0.05)
    p2 = ok_run("heavy separate", "heavy", "--queries", "Qi.npy", "--keys", "Ki.npy", "--eps", 0.05)
    if p1 and p2:
        check("heavy --inputs equals separate files", p1.stdout == p2.stdout and p1.stdout.startswith("head,"))
    np.savez(path("qk_only.npz"), q=Q, k=K)
    bad("attend --inputs without member v", ("attend", "--inputs", "qk_only.npz", "--out", "Oi3.npy"), ("qk_only.npz", "'v'"))
    bad("attend --inputs and --queries", ("attend", "--inputs", "qkv.npz", "--queries", "Qi.npy", "--out", "Oi3.npy"),
        ("inputs",))
    # --save-selection: the keys each query attended, as masks that reproduce the output.
    if ok_run("attend --save-selection leverage", "attend", "--inputs", "qkv.npz", "--out", "Os.npy",
              "--save-selection", "Ss.npz", *sel):
        z = np.load(path("Ss.npz"))
        O = np.load(path("Os.npy"))
        ok = int(z["window"][0]) == 1 and int(z["sinks"][0]) == 0 and len(z["shared_offsets"]) == 3
        I, J = np.arange(40)[:, None], np.arange(70)[None, :]
        for h in range(2):
            keys = z["shared_keys"][z["shared_offsets"][h]:z["shared_offsets"][h + 1]]
            tau, _ = np_leverage(K[h])
            ok = ok and sorted(keys.tolist()) == sorted(np.argsort(-tau, kind="stable")[:6].tolist())
            shared = np.zeros(70, dtype=bool)
            shared[keys] = True
            good, det = rel_close(O[h], np_attention(Q[h], K[h], V[h], mask=shared[None, :] | (np.abs(I - J) <= 1)))
            ok = ok and good
        check("--save-selection (leverage): shared keys are the top-6 and reproduce the output", ok)
    if ok_run("attend --save-selection topk", "attend", "--inputs", "qkv.npz", "--out", "Ot2.npy",
              "--save-selection", "St.npz", "--select", "topk:5"):
        z = np.load(path("St.npz"))
        qk = z["query_keys"]
        s0 = Q[0].astype(np.float64) @ K[0].astype(np.float64).T
        ref = np.argsort(-s0, axis=1, kind="stable")[:, :5]
        check("--save-selection (topk): query_keys of shape (2, 40, 5), the top-5 of each query of head 0",
              qk.shape == (2, 40, 5) and all(set(qk[0, i]) == set(ref[i]) for i in range(40)), repr(qk.shape))
        check("--save-selection (topk): shared_offsets has one entry per head + 1, every set empty",
              list(z["shared_offsets"]) == [0, 0, 0] and z["shared_keys"].size == 0, repr(z["shared_offsets"]))
    # +residual: each block's sampled keys and their weight (one block of 40 queries), which with
    # the shared keys and the band reproduce the output (numpy, the weights written out).
    if ok_run("attend --save-selection residual", "attend", "--inputs", "qkv.npz", "--out", "Or.npy",
              "--save-selection", "Sr.npz", "--select", "leverage:6+window:1+residual:8+seed:3"):
        z = np.load(path("Sr.npz"))
        O = np.load(path("Or.npy"))
        rk, rw = z["residual_keys"], z["residual_weight"]
        ok = rk.shape == (2, 1, 8) and rw.shape == (2, 1) and int(z["residual_block"][0]) == 256
        I, J = np.arange(40)[:, None], np.arange(70)[None, :]
        for h in range(2) if ok else ():
            shared = z["shared_keys"][z["shared_offsets"][h]:z["shared_offsets"][h + 1]]
            ok = ok and not np.isin(rk[h, 0], shared).any() and np.all(np.diff(rk[h, 0]) > 0)
            ok = ok and np.isclose(rw[h, 0], (70 - len(shared)) / 8)  # the block's rest: every key not shared
            W = np.zeros((40, 70))
            W[:, rk[h, 0]] = rw[h, 0]
            W[:, shared] = 1.0
            W[np.abs(I - J) <= 1] = 1.0
            s_ = Q[h].astype(np.float64) @ K[h].astype(np.float64).T / np.sqrt(8.0)
            e = np.exp(s_ - s_.max(1, keepdims=True)) * W
            good, det = rel_close(O[h], (e @ V[h]) / e.sum(1, keepdims=True))
            ok = ok and good
        check("--save-selection (residual): sampled keys outside the shared set, weights |U| / r, output reproduced",
              ok)
    bad("+residual with select full", ("attend", "--inputs", "qkv.npz", "--out", "Orf.npy", "--select", "full+residual:3"),
        ("residual", "select full"))
    # A cluster search that finds fewer than top_k keys says so (stderr, and short_queries in JSON).
    p = ok_run("attend cluster with too small a probe", "attend", "--inputs", "qkv.npz", "--out", "Oc.npy", "--select",
               "cluster:30+clusters:20+probe:1", "--json")
    if p:
        j = parse_json("attend cluster", p.stdout)
        check("cluster: short_queries counted and reported", j is not None and j.get("short_queries", 0) > 0
              and "fewer than top_k = 30" in p.stderr, repr((j, p.stderr)))
    bad("--probe with a selection other than cluster", ("attend", "--inputs", "qkv.npz", "--out", "Op.npy", "--select",
                                                         "leverage:4+probe:2"), ("probe", "cluster"))
    bad("--clusters with topk", ("attend", "--inputs", "qkv.npz", "--out", "Op.npy", "--select", "topk:4+clusters:3"),
        ("clusters", "cluster only"))
    bad("--save-selection with select full", ("attend", "--inputs", "qkv.npz", "--out", "Of.npy", "--save-selection",
                                              "Sf.npz"), ("select full",))
    check("a refused --save-selection wrote no output", not os.path.exists(path("Of.npy")))
    # universal on a stack: one set per (batch, head), each as the 2-D run gives it.
    K4 = (rng.standard_normal((2, 2, 60, 6)) * np.exp(rng.standard_normal((2, 2, 60, 1)))).astype(np.float32)
    save("K4u.npy", K4)
    p = ok_run("universal 4-D --json", "universal", "--keys", "K4u.npy", "--top-k", 7, "--json", "--out", "U4.npz")
    if p:
        j = parse_json("universal 4-D", p.stdout)
        z = np.load(path("U4.npz"))
        ok = j is not None and len(j["sets"]) == 4 and j["scores_of"] == "selected keys" and j["batch_heads"] == [2, 2]
        for h, hidx in enumerate(np.ndindex(2, 2)):
            tau, _ = np_leverage(K4[hidx])
            expect = sorted(np.argsort(-tau, kind="stable")[:7].tolist())
            ok = ok and j["sets"][h]["indices"] == expect
            ok = ok and z["indices"][z["offsets"][h]:z["offsets"][h + 1]].tolist() == expect
        check("universal 4-D: every (batch, head) set is that head's top-7, in JSON and in the .npz", ok)
    bad("universal stack into .npy", ("universal", "--keys", "K4u.npy", "--top-k", 7, "--out", "U4.npy"), ("npz",))
    # Full row rank (n <= d): every score is 1, top-k says the choice among ties was by index.
    save("Kwide.npy", rng.standard_normal((6, 10)))
    p = ok_run("universal --top-k on full-row-rank K", "universal", "--keys", "Kwide.npy", "--top-k", 2, "--json")
    if p:
        j = parse_json("universal ties", p.stdout)
        check("universal --top-k reports ties left out (all scores 1)",
              j is not None and j["ties_left_out"] == 4 and j["indices"] == [0, 1], repr(j))


def test_bad_input():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((100, 8)).astype(np.float32)
    Q = rng.standard_normal((50, 8)).astype(np.float32)
    V = rng.standard_normal((100, 4)).astype(np.float32)
    save("Kb.npy", K)
    save("Qb.npy", Q)
    save("Vb.npy", V)
    raw = open(path("Kb.npy"), "rb").read()
    with open(path("Ktrunc.npy"), "wb") as f:
        f.write(raw[:-7])
    with open(path("Klies.npy"), "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (200, 8)})
        f.write(K.tobytes())
    Kn = K.copy()
    Kn[3, 2] = np.nan
    save("Knan.npy", Kn)
    Vi = V.copy()
    Vi[7, 1] = np.inf
    save("Vinf.npy", Vi)
    save("Q5.npy", rng.standard_normal((50, 5)))
    save("K1d.npy", K[:, 0])
    save("Kempty.npy", np.zeros((0, 8)))

    att = ("attend", "--queries", "Qb.npy", "--keys", "Kb.npy", "--values", "Vb.npy", "--out", "Ob.npy")
    bad("missing file", ("universal", "--keys", "nope.npy", "--eps", 0.1), ("nope.npy",))
    bad("truncated .npy", ("universal", "--keys", "Ktrunc.npy", "--eps", 0.1), ("Ktrunc.npy",))
    bad("header shape larger than the data", ("universal", "--keys", "Klies.npy", "--eps", 0.1), ("Klies.npy",))
    # The library names the argument (its Error's field); the CLI adds the file it came from.
    bad("NaN in keys (universal)", ("universal", "--keys", "Knan.npy", "--eps", 0.1),
        ("keys (Knan.npy): expected finite values",))
    bad("NaN in keys (heavy)", ("heavy", "--queries", "Qb.npy", "--keys", "Knan.npy", "--eps", 0.1),
        ("keys (Knan.npy): expected finite values",))
    bad("Inf in values (attend)", ("attend", "--queries", "Qb.npy", "--keys", "Kb.npy", "--values", "Vinf.npy",
                                   "--out", "Ob.npy"), ("values (Vinf.npy): expected finite values",))
    for e in ("0", "1.5", "-1"):
        bad("universal --eps %s" % e, ("universal", "--keys", "Kb.npy", "--eps", e), ("eps",))
        bad("heavy --eps %s" % e, ("heavy", "--queries", "Qb.npy", "--keys", "Kb.npy", "--eps", e), ("eps",))
    bad("universal with both --eps and --top-k", ("universal", "--keys", "Kb.npy", "--eps", 0.1, "--top-k", 3),
        ("eps", "top-k"))
    bad("universal with neither --eps nor --top-k", ("universal", "--keys", "Kb.npy"), ("eps", "top-k"))
    bad("universal --top-k 0", ("universal", "--keys", "Kb.npy", "--top-k", 0), ("top-k",))
    bad("heavy: queries and keys of different d", ("heavy", "--queries", "Q5.npy", "--keys", "Kb.npy", "--eps", 0.1),
        ("queries", "keys"))
    bad("attend: queries and keys of different d",
        ("attend", "--queries", "Q5.npy", "--keys", "Kb.npy", "--values", "Vb.npy", "--out", "Ob.npy"),
        ("queries", "keys"))
    bad("1-D keys", ("universal", "--keys", "K1d.npy", "--eps", 0.1), ("K1d.npy", "keys", "2-D"))
    bad("empty keys (universal)", ("universal", "--keys", "Kempty.npy", "--eps", 0.1), ("keys", "Kempty.npy", "empty"))
    bad("empty keys (heavy)", ("heavy", "--queries", "Qb.npy", "--keys", "Kempty.npy", "--eps", 0.1),
        ("keys", "Kempty.npy", "empty"))
    bad("empty queries (attend)", ("attend", "--queries", "Kempty.npy", "--keys", "Kb.npy", "--values", "Vb.npy",
                                   "--out", "Ob.npy"), ("queries", "Kempty.npy", "empty"))
    bad("attend --select full:5", att + ("--select", "full+top_k:5"), ("top_k",))
    bad("attend full+kernel:poly+p:0", att + ("--select", "full+kernel:poly+p:0"), ("p",))
    bad("attend --select leverage without top_k or eps", att + ("--select", "leverage"), ("top", "eps"))
    bad("attend kernel unknown", att + ("--select", "full+kernel:cosine"), ("kernel", "cosine"))
    for old, spec in (("--top-k", "leverage:32"), ("--window", "window:"), ("--kernel", "kernel:poly"),
                      ("--probe", "probe:"), ("--seed", "seed:"), ("--budget", "budget_alpha")):
        bad("attend %s (the selection is one spec)" % old, att + ("--select", "leverage", old, 3), (old, spec))
    bad("unknown option", ("universal", "--keys", "Kb.npy", "--eps", 0.1, "--bogus"), ("--bogus",))
    bad("unknown subcommand", ("frobnicate",), ("frobnicate",))
    bad("no subcommand", (), ("subcommand",))
    bad("output into a missing directory", ("universal", "--keys", "Kb.npy", "--eps", 0.1, "--out", "nodir/U.npy"),
        ("nodir",))
    check("failed commands left no output behind", not os.path.exists(path("Ob.npy")))


def test_atomic_output():
    rng = np.random.default_rng(9)
    Q = rng.standard_normal((40, 8)).astype(np.float32)
    K = rng.standard_normal((60, 8)).astype(np.float32)
    V = rng.standard_normal((60, 4)).astype(np.float32)
    sub = path("atomic")
    os.mkdir(sub)
    np.save(os.path.join(sub, "Q.npy"), Q)
    np.save(os.path.join(sub, "K.npy"), K)
    Vn = V.copy()
    Vn[5, 0] = np.nan
    np.save(os.path.join(sub, "V.npy"), Vn)
    Kn = K.copy()
    Kn[0, 0] = np.nan
    np.save(os.path.join(sub, "Kn.npy"), Kn)
    content = b"known content, not an array\n" * 10
    for f in ("O.npy", "U.npy", "H.csv"):
        with open(os.path.join(sub, f), "wb") as fh:
            fh.write(content)
    before = sorted(os.listdir(sub))
    j = lambda f: os.path.join("atomic", f)  # noqa: E731
    p = run("attend", "--queries", j("Q.npy"), "--keys", j("K.npy"), "--values", j("V.npy"), "--out", j("O.npy"))
    check("atomic: failing attend exits 2", p.returncode == 2, "rc=%d %r" % (p.returncode, p.stderr))
    p = run("universal", "--keys", j("Kn.npy"), "--eps", 0.1, "--out", j("U.npy"))
    check("atomic: failing universal exits 2", p.returncode == 2, "rc=%d %r" % (p.returncode, p.stderr))
    p = run("heavy", "--queries", j("Q.npy"), "--keys", j("Kn.npy"), "--eps", 0.1, "--out", j("H.csv"))
    check("atomic: failing heavy exits 2", p.returncode == 2, "rc=%d %r" % (p.returncode, p.stderr))
    unchanged = all(open(os.path.join(sub, f), "rb").read() == content for f in ("O.npy", "U.npy", "H.csv"))
    check("atomic: existing output files unchanged after a failure", unchanged)
    after = sorted(os.listdir(sub))
    check("atomic: no temporary files left after a failure", after == before, "%r -> %r" % (before, after))
    # A successful run replaces the file and also leaves nothing behind.
    p = run("attend", "--queries", j("Q.npy"), "--keys", j("K.npy"), "--values", j("K.npy"), "--out", j("O.npy"))
    ok = p.returncode == 0 and np.load(os.path.join(sub, "O.npy")).shape == (40, 8)
    check("atomic: a successful run replaces the output", ok, "rc=%d %r" % (p.returncode, p.stderr))
    check("atomic: no temporary files left after success", sorted(os.listdir(sub)) == before)


def np_evaluate_row(Q, K, V, mask, heavy_eps, p, scale=None):
    """softmax mass, output error, x^2 and |x|^p heavy recall of one head's selection mask."""
    Q, K, V = (np.asarray(x, np.float64) for x in (Q, K, V))
    s = Q @ K.T
    sc = 1 / np.sqrt(Q.shape[1]) if scale is None else scale
    soft = np.exp(s * sc - (s * sc).max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    x2 = s ** 2 / (s ** 2).sum(axis=1, keepdims=True)
    pw = np.abs(s) ** p / (np.abs(s) ** p).sum(axis=1, keepdims=True)
    full = soft @ V
    approx = np_attention(Q, K, V, mask=mask, scale=sc)
    recall = lambda w: (mask & (w >= heavy_eps)).sum() / max((w >= heavy_eps).sum(), 1)
    return {"softmax_mass": (soft * mask).sum(axis=1).mean(),
            "output_error": np.linalg.norm(approx - full) / np.linalg.norm(full),
            "x2_heavy_recall": recall(x2), "power_heavy_recall": recall(pw)}


def test_evaluate():
    """evaluate against numpy: per head and selection, mass, output error and heavy recalls."""
    rng = np.random.default_rng(41)
    Q, K, V = rng.standard_normal((2, 90, 8)), rng.standard_normal((2, 120, 8)) * np.array([3.0] + [1.0] * 7), \
        rng.standard_normal((2, 120, 4))
    np.savez(path("E.npz"), q=Q, k=K, v=V)
    p = ok_run("evaluate", "evaluate", "--inputs", "E.npz", "--select", "topk:7", "--select", "window:5",
               "--select", "leverage:10", "--heavy-eps", 0.05, "--p", 3, "--json")
    j = parse_json("evaluate", p.stdout) if p else None
    if not j:
        return
    rows = j["rows"]
    check("evaluate: one row per (head, selection)", len(rows) == 6 and [r["pair"] for r in rows] == [0, 0, 0, 1, 1, 1],
          repr([(r["pair"], r["selection"]) for r in rows]))
    for r in rows:
        h = r["pair"]
        s = Q[h] @ K[h].T
        i, jj = np.indices(s.shape)
        if r["selection"].startswith("topk"):
            mask = np.zeros(s.shape, bool)
            np.put_along_axis(mask, np.argsort(-s, axis=1, kind="stable")[:, :7], True, axis=1)
        elif r["selection"].startswith("window"):
            mask = np.abs(i - jj) <= 5
        else:
            tau = np_leverage(K[h])[0]
            mask = np.zeros(s.shape, bool)
            mask[:, np.argsort(-tau, kind="stable")[:10]] = True
        ref = np_evaluate_row(Q[h], K[h], V[h], mask, 0.05, 3.0)
        for field, value in ref.items():
            check("evaluate %s head %d: %s" % (r["selection"], h, field), abs(r[field] - value) <= 1e-4 * max(1, abs(value)),
                  "%r vs numpy %r" % (r[field], value))
    # --scale: the softmax of every selection and of full attention at that scale; rows name it.
    p = ok_run("evaluate --scale", "evaluate", "--inputs", "E.npz", "--select", "topk:7", "--select", "cluster:6",
               "--scale", 0.9, "--p", 3, "--json")
    j = parse_json("evaluate --scale", p.stdout) if p else None
    if j:
        names = [r["selection"] for r in j["rows"][:2]]
        check("evaluate rows name each selection by its spec, cluster's probe as used, and give the scale",
              names[0] == "topk:7" and re.fullmatch(r"cluster:6\+probe:\d+", names[1]) is not None
              and [r["scale"] for r in j["rows"][:2]] == [0.9, 0.9], repr(names))
        for r in j["rows"][::2]:
            h = r["pair"]
            mask = np.zeros((90, 120), bool)
            np.put_along_axis(mask, np.argsort(-(Q[h] @ K[h].T), axis=1, kind="stable")[:, :7], True, axis=1)
            ref = np_evaluate_row(Q[h], K[h], V[h], mask, 0.05, 3.0, scale=0.9)
            for field, value in ref.items():
                check("evaluate --scale 0.9 head %d: %s" % (h, field), abs(r[field] - value) <= 1e-4 * max(1, abs(value)),
                      "%r vs numpy %r" % (r[field], value))
    bad("evaluate with a bad scale", ("evaluate", "--inputs", "E.npz", "--select", "full", "--scale", -1), ("scale",))
    p = ok_run("evaluate table", "evaluate", "--inputs", "E.npz", "--select", "leverage:10+window:2")
    check("evaluate table has a header and a row per head", p is not None and len(p.stdout.splitlines()) >= 4,
          repr(p.stdout if p else ""))
    bad("evaluate with a bad spec", ("evaluate", "--inputs", "E.npz", "--select", "leverage:ten"), ("top_k", "leverage:ten"))
    bad("evaluate with an unknown field", ("evaluate", "--inputs", "E.npz", "--select", "topk:3+wndow:2"), ("wndow",))


def test_stream():
    """stream: the offline universal set (numpy SVD oracle) for every block size, resume = one run, damaged states."""
    rng = np.random.default_rng(43)
    K = (rng.standard_normal((6000, 6)) * 0.05).astype(np.float32)
    K[rng.integers(0, 6000, 18), np.arange(18) % 6] += 4.0
    V = rng.standard_normal((6000, 3)).astype(np.float32)
    np.save(path("SK.npy"), K)
    np.save(path("SV.npy"), V)
    np.save(path("SKhalf.npy"), K[:2500])
    np.save(path("SVhalf.npy"), V[:2500])
    tau, _ = np_leverage(K)
    want = [int(j) for j in np.nonzero(tau >= 0.05)[0]]
    check("stream: the oracle set is small and non-empty", 0 < len(want) < 100, repr(len(want)))
    runs = {}
    for block in (1, 999, 6000, 100000):
        p = ok_run("stream block %d" % block, "stream", "--keys", "SK.npy", "--values", "SV.npy", "--eps", 0.05,
                   "--block", block, "--json")
        j = parse_json("stream", p.stdout) if p else None
        if not j:
            continue
        runs[block] = j
        check("stream block %d: n, size and indices (ascending) as the numpy oracle" % block,
              j["n"] == 6000 and j["size"] == len(want) and j["indices"] == want, repr((j["n"], j["size"], j["indices"][:8])))
        check("stream block %d: peak_workspace_bytes reported" % block, j["peak_workspace_bytes"] > 0)
    if len(runs) == 4:
        check("stream: the same scores for every block size",
              all(r["scores"] == runs[1]["scores"] for r in runs.values()))
    p = ok_run("universal", "universal", "--keys", "SK.npy", "--eps", 0.05, "--json")
    j = parse_json("universal", p.stdout) if p else None
    if j and 999 in runs:
        check("stream = universal (indices and scores)", j["indices"] == runs[999]["indices"] and j["scores"] == runs[999]["scores"])
    ok_run("stream checkpoint", "stream", "--keys", "SKhalf.npy", "--values", "SVhalf.npy", "--eps", 0.05,
           "--checkpoint", "S.state")
    p = ok_run("stream resume", "stream", "--keys", "SK.npy", "--values", "SV.npy", "--eps", 0.05, "--resume", "S.state",
               "--json")
    j = parse_json("stream resume", p.stdout) if p else None
    if j and 999 in runs:
        check("stream resume: continues at key 2500 and ends with the one-run set",
              j["resumed_from"] == 2500 and j["indices"] == runs[999]["indices"] and j["scores"] == runs[999]["scores"],
              repr((j["resumed_from"], j["size"])))
    # The state is an .npz archive of named members that numpy reads.
    with np.load(path("S.state")) as z:
        members = {name: z[name] for name in z.files}
    check("stream state: numpy reads its members", members["version"].tolist() == [3] and
          members["n"].tolist() == [2500] and members["keys"].shape[1] == 6 and members["values"].shape[1] == 3 and
          members["index"].tolist() == sorted(members["index"].tolist()), repr(sorted(members)))
    state = open(path("S.state"), "rb").read()
    open(path("S_trunc.state"), "wb").write(state[:len(state) // 2])
    flipped = bytearray(state)
    at = state.find(members["keys"].tobytes()[:16])  # inside the keys' data (stored, not deflated)
    flipped[at + 5] ^= 0x20
    open(path("S_flip.state"), "wb").write(bytes(flipped))
    with open(path("S_ver.state"), "wb") as f:
        np.savez(f, **dict(members, version=np.array([9], np.int64)))
    for name, what in (("S_trunc.state", "S_trunc.state"), ("S_flip.state", "CRC-32"), ("S_ver.state", "version")):
        bad("stream resume from %s" % name, ("stream", "--keys", "SK.npy", "--values", "SV.npy", "--eps", 0.05,
                                             "--resume", name), (name, what))
    bad("stream resume with other eps", ("stream", "--keys", "SK.npy", "--values", "SV.npy", "--eps", 0.1, "--resume",
                                         "S.state"), ("eps",))
    bad("stream without values the state holds", ("stream", "--keys", "SK.npy", "--eps", 0.05, "--resume", "S.state"),
        ("dv",))
    bad("stream with eps out of range", ("stream", "--keys", "SK.npy", "--eps", 1.5), ("eps",))
    np.save(path("SK3.npy"), K.reshape(2, 3000, 6))
    bad("stream of a 3-D key file", ("stream", "--keys", "SK3.npy", "--eps", 0.05), ("SK3.npy", "2 dimensions"))
    Kn = K.copy()
    Kn[4321, 2] = np.nan
    np.save(path("SKnan.npy"), Kn)
    bad("stream with a NaN key", ("stream", "--keys", "SKnan.npy", "--eps", 0.05, "--block", 1000),
        ("SKnan.npy", "keys", "4000"))


def np_heavy_causal(Q, K, eps):
    """Causal brute force: A_ij over keys j <= i; sure and too-close-to-call entries as np_heavy."""
    S = np.tril((np.asarray(Q, np.float64) @ np.asarray(K, np.float64).T) ** 2)
    A = S / S.sum(axis=1, keepdims=True)
    return A, A >= eps * (1 + 1e-4), np.abs(A - eps) <= 1e-4 * eps


def test_causal():
    """attend --causal (every selection cut at the query; leverage keeps every heavy causal entry) and heavy --causal."""
    rng = np.random.default_rng(17)
    n, d, dv, eps = 600, 8, 5, 0.1
    Q = rng.standard_normal((n, d)).astype(np.float32)
    K = heavy_tailed_keys(rng, n, d).astype(np.float32)
    V = rng.standard_normal((n, dv)).astype(np.float32)
    save("Qc.npy", Q)
    save("Kc.npy", K)
    save("Vc.npy", V)
    I = np.arange(n)[:, None]
    J = np.arange(n)[None, :]
    tril = J <= I
    files = dict(q="Qc.npy", k="Kc.npy", v="Vc.npy")
    O, p = attend("attend --causal", "Oc_full.npy", "--causal", "--json", **files)
    if O is not None:
        good, det = rel_close(O, np_attention(Q, K, V, mask=tril))
        check("attend --causal full equals numpy over keys j <= i (1e-5)", good, det)
        j = parse_json("attend --causal", p.stdout)
        check("attend --causal --json: causal true, (n + 1) / 2 keys per query",
              j is not None and j["causal"] is True and abs(j["mean_keys_per_query"] - (n + 1) / 2) < 1e-6, repr(j))
    O, _ = attend("attend --causal window", "Oc_win.npy", "--causal", "--select", "window:5+sinks:2",
                  **files)
    if O is not None:
        mask = tril & ((I - J <= 5) | (J < 2))
        good, det = rel_close(O, np_attention(Q, K, V, mask=mask))
        check("attend --causal window 5 + sinks 2 equals numpy (1e-5)", good, det)
    O, _ = attend("attend --causal topk", "Oc_top.npy", "--causal", "--select", "topk:10", **files)
    if O is not None:
        s = np.where(tril, np.asarray(Q, np.float64) @ np.asarray(K, np.float64).T, -np.inf)
        top = np.argsort(-s, axis=1, kind="stable")[:, :10]
        mask = np.zeros((n, n), dtype=bool)
        np.put_along_axis(mask, top, True, axis=1)
        good, det = rel_close(O, np_attention(Q, K, V, mask=mask & tril))
        check("attend --causal topk 10 equals numpy's top 10 among keys j <= i (1e-5)", good, det)
    O, p = attend("attend --causal leverage", "Oc_lev.npy", "--causal", "--select", "leverage+eps:%r+window:8" % eps,
                  "--save-selection", "Sc.npz", "--json", **files)
    if O is not None:
        z = np.load(path("Sc.npz"))
        seg = int(z["segment"][0])
        keys, offs = z["shared_keys"], z["shared_offsets"]
        check("attend --causal leverage: one set per block of `segment` queries",
              seg > 0 and len(offs) - 1 == (n + seg - 1) // seg and int(z["causal"][0]) == 1, repr((seg, len(offs))))
        mask = np.zeros((n, n), dtype=bool)
        for b in range(len(offs) - 1):
            mask[b * seg:(b + 1) * seg, keys[offs[b]:offs[b + 1]]] = True
        mask = (mask | (np.abs(I - J) <= 8)) & tril
        good, det = rel_close(O, np_attention(Q, K, V, mask=mask))
        check("attend --causal leverage equals numpy over its saved selection (1e-5)", good, det)
        A, sure, _ = np_heavy_causal(Q, K, eps)
        missed = int(np.sum(sure & ~mask))
        check("attend --causal leverage: every causal x^2 entry >= eps is attended (numpy brute force)",
              missed == 0 and int(np.sum(sure)) > 50, "%d missed of %d" % (missed, int(np.sum(sure))))
        j = parse_json("attend --causal leverage", p.stdout)
        check("attend --causal leverage: fewer keys per query than causal full",
              j is not None and j["mean_keys_per_query"] < (n + 1) / 2, repr(j and j["mean_keys_per_query"]))
    if ok_run("heavy --causal", "heavy", "--queries", "Qc.npy", "--keys", "Kc.npy", "--eps", eps, "--causal",
              "--out", "Hc.csv"):
        rows = read_csv("Hc.csv", False)
        body = [(int(r[0]), int(r[1]), float(r[2])) for r in rows[1:]]
        A, sure, unsure = np_heavy_causal(Q, K, eps)
        got = {(q, k) for q, k, _ in body}
        exp = {(int(a), int(b)) for a, b in zip(*np.nonzero(sure))}
        amb = {(int(a), int(b)) for a, b in zip(*np.nonzero(unsure))}
        check("heavy --causal: the (query, key) set of numpy's causal brute force", (got - amb) == (exp - amb) and exp,
              "missing %s extra %s" % (sorted(exp - got - amb)[:5], sorted(got - exp - amb)[:5]))
        check("heavy --causal: values within 1e-4 relative, keys j <= i",
              all(abs(v - A[q, k]) <= 1e-4 * A[q, k] and k <= q for q, k, v in body))
    Q3 = np.stack([Q[:300], Q[300:]])
    K3 = np.stack([K[:300], K[300:]])
    save("Qc3.npy", Q3)
    save("Kc3.npy", K3)
    if ok_run("heavy --causal 3-D", "heavy", "--queries", "Qc3.npy", "--keys", "Kc3.npy", "--eps", eps, "--causal",
              "--out", "Hc3.csv"):
        body = [(int(r[0]), int(r[1]), int(r[2])) for r in read_csv("Hc3.csv", True)[1:]]
        same = True
        for h in range(2):
            A, sure, unsure = np_heavy_causal(Q3[h], K3[h], eps)
            got = {(q, k) for hh, q, k in body if hh == h}
            exp = {(int(a), int(b)) for a, b in zip(*np.nonzero(sure))}
            amb = {(int(a), int(b)) for a, b in zip(*np.nonzero(unsure))}
            same = same and (got - amb) == (exp - amb) and bool(exp)
        check("heavy --causal 3-D: each head's entries are numpy's causal brute force", same)
    save("Qc_short.npy", Q[:500])
    bad("attend --causal with m != n", ("attend", "--queries", "Qc_short.npy", "--keys", "Kc.npy", "--values", "Vc.npy",
                                        "--out", "Oc_bad.npy", "--causal"), ("as many queries as keys",))
    bad("attend --causal leverage with --top-k", ("attend", "--queries", "Qc.npy", "--keys", "Kc.npy", "--values",
                                                  "Vc.npy", "--out", "Oc_bad.npy", "--causal", "--select", "leverage:10"),
        ("eps",))
    bad("heavy --causal --p 3", ("heavy", "--queries", "Qc.npy", "--keys", "Kc.npy", "--eps", eps, "--causal", "--p", 3),
        ("causal",))


def run_limited(limit, *args, timeout=60):
    """run(*args) with the address space limited to `limit` bytes (ulimit -v); None on a timeout."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    try:
        return subprocess.run([BIN] + [str(a) for a in args], cwd=WORK, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, universal_newlines=True,
                              preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return None


def test_memory_limit():
    info = json.loads(run("info", "--json").stdout)
    if info["sanitizers"]:
        return  # AddressSanitizer reserves terabytes of address space: no limit lets it start
    # The least address space the command starts in (OpenBLAS reserves its buffers at load, and
    # below that spins in its constructor, before levattn runs: a timeout here, not a finding).
    mb = 1 << 20
    base = next((m * mb for m in range(256, 4096, 64) if (p := run_limited(m * mb, "info", timeout=5)) and
                 p.returncode == 0), None)
    if not check("memory limit: the command starts under some limit", base is not None):
        return
    rng = np.random.default_rng(5)
    for name in ("Qm.npy", "Km.npy", "Vm.npy"):
        save(name, rng.standard_normal((200000, 64)))  # 51 MB each
    args = ["attend", "--queries", "Qm.npy", "--keys", "Km.npy", "--values", "Vm.npy", "--out", "Om.npy",
            "--select", "leverage:64"]
    outcomes = []
    for extra in (60, 150, 300, 600, 1500):
        label = "memory limit %d MiB over the start" % extra
        p = run_limited(base + extra * mb, *args)
        if not check(label + ": ends within 60 s", p is not None):
            continue
        written = os.path.exists(path("Om.npy"))
        check(label + ": exit 0 or 1", p.returncode in (0, 1), "rc=%d %r" % (p.returncode, p.stderr[-400:]))
        if p.returncode == 0:
            check(label + ": output written", written)
            os.remove(path("Om.npy"))
        else:
            line = p.stderr.strip()
            named = re.match(r"levattn: (\S+\.npy|output \(Om\.npy\)|the BLAS work buffer.*?): cannot allocate "
                             r"[0-9.e+]+ bytes", line) or "working buffer could not be allocated" in line
            check(label + ": one message naming the array and the bytes", bool(named) and "\n" not in line, line)
            check(label + ": nothing written", not written and not [f for f in os.listdir(WORK) if ".tmp." in f])
        outcomes.append(p.returncode)
    check("memory limit: the tightest fails naming an input, the loosest runs",
          outcomes[:1] == [1] and outcomes[-1:] == [0], repr(outcomes))
    for name in ("Qm.npy", "Km.npy", "Vm.npy"):
        os.remove(path(name))


def main():
    global WORK
    if not os.access(BIN, os.X_OK):
        print("FAIL: %s is not an executable" % BIN)
        print("0 passed, 1 failed")
        return 1
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="levattn_cli_") as d:
        WORK = d
        for g in (test_info, test_planted, test_universal, test_heavy, test_attend, test_power_and_sketch, test_reduce,
                  test_bench, test_demo,
                  test_bad_input, test_atomic_output, test_hardening, test_evaluate, test_stream, test_causal,
                  test_memory_limit):
            t0 = time.time()
            group(g)
            print("%-20s %.1f s" % (g.__name__, time.time() - t0), flush=True)
    print("total %.1f s" % (time.time() - start))
    print("%d passed, %d failed" % (PASSED, len(FAILED)))
    return 1 if FAILED else 0


WORK = None
if __name__ == "__main__":
    sys.exit(main())
