#!/usr/bin/env python3
"""Plot the output of levattn_budget_sweep (docs/budgets.md): relative output error against n,
one panel per data set, fixed versus n^C-adaptive budgets, exact top-k versus leverage + window.

usage: plot_budget_sweep.py [--csv docs/budget_sweep.csv] [--out docs/budget_sweep.png]
                            [--alpha A] [--c C] [--k0 K]
--alpha, --c and --k0 only label the title; pass the values the sweep ran with. Other options
(those of the sweep, e.g. --max-n) are accepted and ignored, so one argument list serves both.
"""
import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = [  # (method, budget, colour, line style, marker)
    ("topk", "fixed", "tab:blue", "--", "o"),
    ("topk", "adaptive", "tab:blue", "-", "o"),
    ("leverage+window", "fixed", "tab:orange", "--", "s"),
    ("leverage+window", "adaptive", "tab:orange", "-", "s"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--csv", default=os.path.join(ROOT, "docs", "budget_sweep.csv"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "budget_sweep.png"))
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--c", type=float, default=0.5)
    ap.add_argument("--k0", type=int, default=32)
    args, _ = ap.parse_known_args()

    rows = {}
    with open(args.csv, newline="") as f:
        for r in csv.DictReader(f):
            key = (r["data"], r["method"], r["budget"])
            rows.setdefault(key, []).append((int(r["n"]), float(r["output_error"])))
    if not rows:
        sys.exit(f"plot_budget_sweep.py: no rows in {args.csv}")

    datasets = [d for d in ("planted", "random", "peaked") if any(k[0] == d for k in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.6), squeeze=False)
    labels = {
        "fixed": f"fixed k = {args.k0}",
        "adaptive": f"adaptive k = ceil({args.alpha:g} n^{args.c:g})",
    }
    for ax, data in zip(axes[0], datasets):
        top = 0.0
        ns = set()
        for method, budget, colour, style, marker in LINES:
            pts = sorted(rows.get((data, method, budget), []))
            if not pts:
                continue
            xs, ys = zip(*pts)
            ns.update(xs)
            top = max(top, max(ys))
            name = "exact top-k" if method == "topk" else "leverage top-k + window 16"
            ax.plot(xs, ys, color=colour, linestyle=style, marker=marker, markersize=4,
                    label=f"{name}, {labels[budget]}")
        if top >= 0.3:
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1,
                       label="error 1 = that of the zero output")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(ns))
        ax.set_xticklabels([f"{n // 1024}K" for n in sorted(ns)])
        ax.set_xlabel("context length n (keys)")
        ax.set_ylabel("relative output error  ||O - O_full||_F / ||O_full||_F", fontsize=9)
        ax.set_title(data)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fixed vs n^C-adaptive key budgets, softmax, d = 64 "
                 f"(alpha = {args.alpha:g}, C = {args.c:g}, k0 = {args.k0})")
    fig.tight_layout()
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
