#!/usr/bin/env python3
"""levattn-mpi under mpirun -np P: wall time and bytes per rank against n and P.

Usage: python3 bench/distributed_bench.py [--build build] [--n 65536,1048576] [--ranks 1,2,4]
           [--d 64] [--eps 0.05] [--window 64] [--sinks 4] [--ring-n 16384] [--dir DIR]

For each n: Q, K, V (n x d float32; keys with log-normal norms, so that U_eps is not empty) are
written once, then for each P: `levattn-mpi attend --select leverage` (exact x^2 mode, with a
window and sinks), `levattn-mpi universal` and `levattn-mpi heavy`, each timed by its wall clock
(mpirun start-up included) and by its own JSON; the bytes are the largest per-rank sent and
received of the computation (the output is written by MPI-IO, so it moves no rows between
ranks; heavy's entries are gathered to rank 0 and counted separately). `levattn attend` (one
process, both cores) is the single-process reference at P = 1. The ring (`--select full`) runs at
--ring-n only: its bytes grow with n by design (it is the exact baseline).
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--n", default="65536,1048576")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--ring-n", type=int, default=16384)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    mpi_bin = os.path.abspath(os.path.join(a.build, "levattn-mpi"))
    single = os.path.abspath(os.path.join(a.build, "levattn"))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    ranks = [int(x) for x in a.ranks.split(",")]
    work = a.dir or tempfile.mkdtemp(prefix="levattn_dist_bench_")

    def run(cmd):
        t0 = time.time()
        p = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if p.returncode != 0:
            raise SystemExit("failed: %s\n%s" % (" ".join(cmd), p.stderr[-2000:]))
        return time.time() - t0, p.stdout

    def mpi(P, *args):
        return run(["mpirun", "-n", str(P), "--oversubscribe", mpi_bin] + [str(x) for x in args] + ["--json"])

    def volume(j, key="bytes"):
        r = j["per_rank"]
        return max(x[key + "_sent"] for x in r), max(x[key + "_received"] for x in r)

    print("d = %d, eps = %g, window %d, sinks %d; bytes: largest per rank (sent / received)" %
          (a.d, a.eps, a.window, a.sinks))
    print("%9s %2s %-10s %9s %9s %12s %12s %7s" % ("n", "P", "command", "wall s", "own s", "sent", "received", "|U|"))
    sizes = [int(x) for x in a.n.split(",")]
    for n in sorted(set(sizes + [a.ring_n])):
        rng = np.random.default_rng(n)
        K = rng.standard_normal((n, a.d), dtype=np.float32)
        K *= np.exp(1.5 * rng.standard_normal((n, 1))).astype(np.float32)
        np.save(os.path.join(work, "K.npy"), K)
        del K
        np.save(os.path.join(work, "Q.npy"), rng.standard_normal((n, a.d), dtype=np.float32))
        np.save(os.path.join(work, "V.npy"), rng.standard_normal((n, a.d), dtype=np.float32))
        qkv = ["--queries", "Q.npy", "--keys", "K.npy", "--values", "V.npy"]
        lev = ["--select", "leverage+eps:%r+window:%d+sinks:%d" % (a.eps, a.window, a.sinks)]
        if n in sizes:
            wall, out = run([single, "attend"] + [str(x) for x in qkv + lev] + ["--out", "ref.npy", "--json"])
            j = json.loads(out)
            print("%9d %2s %-10s %9.2f %9.2f %12s %12s %7d" % (n, "-", "levattn", wall, j["seconds"]["total"], "-", "-",
                                                               j["shared_sizes"][0]))
            for P in ranks:
                wall, out = mpi(P, "attend", *qkv, *lev, "--out", "out.npy")
                j = json.loads(out)
                s, r = volume(j)
                print("%9d %2d %-10s %9.2f %9.2f %12d %12d %7d" % (n, P, "attend", wall, j["seconds"]["total"], s, r,
                                                                   j["shared_sizes"][0]))
                wall, out = mpi(P, "universal", "--keys", "K.npy", "--eps", a.eps)
                j = json.loads(out)
                s, r = volume(j)
                print("%9d %2d %-10s %9.2f %9.2f %12d %12d %7d" % (n, P, "universal", wall, j["seconds"], s, r,
                                                                   j["sets"][0]["size"]))
                wall, out = mpi(P, "heavy", "--queries", "Q.npy", "--keys", "K.npy", "--eps", 0.5, "--out", "h.npz")
                j = json.loads(out)
                s, r = volume(j)
                gs, gr = volume(j, "output_bytes")
                print("%9d %2d %-10s %9.2f %9.2f %12d %12d %7d  (+ %d / %d bytes of entries to rank 0)" %
                      (n, P, "heavy", wall, j["seconds"], s, r, j["universal_size"], gs, gr))
        if n == a.ring_n:
            for P in ranks:
                wall, out = mpi(P, "attend", *qkv, "--select", "full", "--out", "out.npy")
                j = json.loads(out)
                s, r = volume(j)
                print("%9d %2d %-10s %9.2f %9.2f %12d %12d %7s" % (n, P, "ring full", wall, j["seconds"]["total"], s, r, "-"))


if __name__ == "__main__":
    main()
