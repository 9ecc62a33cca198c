"""The ViT experiment's figure and tables from the JSON that `vit_fashion.py evaluate` writes.

    .venv/bin/python python/experiments/plot_vit.py runs/vit.json --png docs/vit.png > tables.md

Prints the markdown tables of docs/vit.md (accuracy, accuracy relative to the softmax model with
full attention, per layer softmax mass captured and relative output error) and draws test
accuracy against the key budget k for each selection of the softmax-trained model.
"""
import argparse
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="evaluate outputs, merged in order")
    ap.add_argument("--png")
    a = ap.parse_args()
    rows = [r for path in a.json for r in json.load(open(path))]
    base = next(r["accuracy"] for r in rows if r["model"] == "softmax" and r["selection"] == "full")
    layers = len(rows[0]["layers"])
    head = "| model (trained with) | evaluated with | test images | test accuracy | relative to softmax | keys/query | " + \
        " | ".join(f"L{i} mass / err" for i in range(layers)) + " |"
    print(head)
    print("|" + "---|" * (6 + layers))
    for r in rows:
        keys = r["layers"][0].get("keys_per_query")
        shared = [l.get("shared_size") for l in r["layers"]]
        extra = ""
        if r["selection"].startswith("U_eps") and None not in shared:
            extra = f" (\\|U\\| per layer {', '.join(f'{s:.0f}' for s in shared)})"
        cells = " | ".join(f"{l['softmax_mass']:.3f} / {l['output_error']:.3f}" for l in r["layers"])
        keys_text = "-" if keys is None else f"{keys:.1f}"
        print(f"| {r['model']} | {r['selection']}{extra} | {r.get('test_images', 10000)} | {r['accuracy']:.4f} | "
              f"{r['accuracy'] / base:.3f} | {keys_text} | {cells} |")
    if a.png:
        series = {}
        for r in rows:
            m = re.match(r"(leverage top|window|random|exact top|cluster top)-? ?(\d+)", r["selection"])
            if r["model"] == "softmax" and m:
                series.setdefault(m.group(1).replace(" top", ""), []).append((int(m.group(2)), r["accuracy"]))
        plt.figure(figsize=(6, 4))
        for name, pts in sorted(series.items()):
            pts.sort()
            plt.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        plt.axhline(base, color="k", linestyle="--", label="full softmax")
        plt.xscale("log", base=2)
        plt.xlabel("keys per query k (window: 2 w + 1 with w = k / 2)")
        plt.ylabel("test accuracy")
        plt.title("Fashion-MNIST ViT (197 tokens) trained with softmax,\nevaluated with each selection")
        plt.legend()
        plt.grid(alpha=0.3)
        plt.tight_layout()
        plt.savefig(a.png, dpi=120)


if __name__ == "__main__":
    main()
