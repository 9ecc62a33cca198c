"""The ViT experiment's figure and tables from the JSON files that `vit_fashion.py evaluate` writes.

    .venv/bin/python python/experiments/plot_vit.py docs/vit/*.json --png docs/vit.png > tables.md

Rows of the same model and selection from different seeds are merged: the tables give the mean
test accuracy over the seeds with its sample standard deviation and range, the accuracy relative
to the softmax model of the same seed with full attention, and per layer the softmax mass captured
and the relative output error (means over seeds). A second table gives each model's training
steps and time. The figure draws the mean test accuracy of the softmax-trained model against the
key budget k for each selection, with the range over seeds as error bars.
"""
import argparse
import json
import re
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def spread(values):
    """'mean ± sd [min, max]' (sd and range only with more than one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def merged(rows):
    """{(model, selection): [rows of each seed]} in first-seen order."""
    groups = {}
    order = {"softmax": 0, "leverage": 1, "poly": 2}
    for r in sorted(rows, key=lambda r: order.get(r["model"], 3)):  # stable: selections keep their order
        groups.setdefault((r["model"], r["selection"]), []).append(r)
    return groups


def accuracy_table(groups, base):
    layers = len(next(iter(groups.values()))[0]["layers"])
    print("| model (trained with) | evaluated with | seeds | test accuracy: mean ± sd [min, max] | "
          "relative to softmax | keys/query | " + " | ".join(f"L{i} mass / err" for i in range(layers)) + " |")
    print("|" + "---|" * (6 + layers))
    for (model, selection), rs in groups.items():
        keys = rs[0]["layers"][0].get("keys_per_query")
        shared = [statistics.fmean(r["layers"][i].get("shared_size") or 0 for r in rs) for i in range(layers)]
        extra = f" (\\|U\\| per layer {', '.join(f'{s:.0f}' for s in shared)})" if selection.startswith("U_eps") else ""
        relative = [r["accuracy"] / base[r.get("seed", 0)] for r in rs if r.get("seed", 0) in base]
        cells = " | ".join(f"{statistics.fmean(r['layers'][i]['softmax_mass'] for r in rs):.3f} / "
                           f"{statistics.fmean(r['layers'][i]['output_error'] for r in rs):.3f}" for i in range(layers))
        print(f"| {model} | {selection}{extra} | {len(rs)} | {spread([r['accuracy'] for r in rs])} | "
              f"{statistics.fmean(relative):.3f} | {'-' if keys is None else f'{keys:.1f}'} | {cells} |")


def training_table(groups):
    print("\n| model | seeds | steps | epochs | training seconds: mean ± sd [min, max] | torch |")
    print("|---|---|---|---|---|---|")
    for (model, selection), rs in groups.items():
        if selection != "full":
            continue
        print(f"| {model} | {len(rs)} | {rs[0].get('train_steps', '-')} | {rs[0].get('train_epochs', 1):.0f} | "
              f"{spread([r['train_seconds'] for r in rs]) if 'train_seconds' in rs[0] else '-'} | "
              f"{rs[0].get('torch', '-')} |")


def plot(groups, png):
    series = {}
    for (model, selection), rs in groups.items():
        m = re.match(r"(leverage top|window|random|exact top|cluster top)-? ?(\d+)", selection)
        if model == "softmax" and m:
            acc = [r["accuracy"] for r in rs]
            series.setdefault(m.group(1).replace(" top", ""), []).append(
                (int(m.group(2)), statistics.fmean(acc), min(acc), max(acc)))
    plt.figure(figsize=(6.4, 4.2))
    for name, pts in sorted(series.items()):
        pts.sort()
        plt.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                     marker="o", capsize=3, label=name)
    full = [r["accuracy"] for r in groups[("softmax", "full")]]
    plt.axhline(statistics.fmean(full), color="k", linestyle="--", label="full softmax")
    trained = groups.get(("leverage", "leverage top-32"))
    if trained:
        acc = [r["accuracy"] for r in trained]
        plt.errorbar([32], [statistics.fmean(acc)], yerr=[[statistics.fmean(acc) - min(acc)], [max(acc) - statistics.fmean(acc)]],
                     marker="*", markersize=12, color="k", linestyle="none", capsize=3,
                     label="trained with leverage top-32")
    plt.xscale("log", base=2)
    plt.xlabel("keys per query k (window: 2 w + 1 with w = k / 2)")
    plt.ylabel("test accuracy (mean, range over seeds)")
    plt.title("Fashion-MNIST ViT (197 tokens) trained with softmax,\nevaluated with each selection")
    plt.legend(fontsize=8)
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(png, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="evaluate outputs, merged in order")
    ap.add_argument("--png")
    a = ap.parse_args()
    rows = [r for path in a.json for r in json.load(open(path))]
    groups = merged(rows)
    base = {r.get("seed", 0): r["accuracy"] for r in groups[("softmax", "full")]}
    accuracy_table(groups, base)
    training_table(groups)
    if a.png:
        plot(groups, a.png)


if __name__ == "__main__":
    main()
