"""The vision-transformer experiment (the LevAttention paper's Table 1, at small scale).

Fashion-MNIST (Debian's dataset-fashion-mnist), 28 x 28 images in 2 x 2 patches: 196 patch
tokens plus a class token = 197 tokens, as in ViT-S/16. A small ViT whose attention layers are
levattn.torch.LevSelfAttention, trained with one selection and evaluated with others.

    .venv/bin/python python/experiments/vit_fashion.py train \\
        --attention softmax|leverage|poly --seed 0 --epochs 3 --minutes 600 --out runs/vit/softmax-seed0.pt
    .venv/bin/python python/experiments/vit_fashion.py evaluate \\
        runs/vit/softmax-seed0.pt --out docs/vit/softmax-seed0.json
    .venv/bin/python python/experiments/vit_fashion.py quick

`quick` trains a small model on 2048 images for one short epoch, checks that the loss falls and
evaluates end to end (the test suite runs it).
"""
import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

import levattn
from levattn.torch import LevSelfAttention

DATA = "/usr/share/datasets/fashion-mnist"
ATTENTION = {"softmax": "full", "leverage": "leverage:32", "poly": "full+kernel:poly+p:4"}  # trained with


def load(split):
    """Images (N, 196, 4) float32 (2 x 2 patches, standardised) and labels (N,) int64."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(DATA, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(DATA, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    x = (images.astype(np.float32) / 255.0 - 0.286) / 0.353
    patches = x.reshape(-1, 14, 2, 14, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 196, 4)
    return torch.from_numpy(np.ascontiguousarray(patches)), torch.from_numpy(labels)


class Block(nn.Module):
    def __init__(self, width, heads, select):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = LevSelfAttention(width, heads, select=select)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, pre-norm blocks, linear head."""

    def __init__(self, width=64, depth=4, heads=4, select="full"):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 197, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, select) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, patches):
        x = torch.cat([self.cls.expand(len(patches), -1, -1), self.embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    def set_selection(self, select):
        """Every attention layer's selection spec (evaluation with another selection)."""
        for block in self.blocks:
            block.attn.select = select


def train(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x, y = load("train")
    if args.subset:
        x, y = x[: args.subset], y[: args.subset]
    model = ViT(args.width, args.depth, args.heads, ATTENTION[args.attention])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / args.batch)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    losses, start, step = [], time.time(), 0
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{total} loss {np.mean(losses[-50:]):.4f} "
                      f"{time.time() - start:.0f} s", flush=True)
            if time.time() - start > 60 * args.minutes:
                break
        if time.time() - start > 60 * args.minutes:
            break
    info = {"attention": args.attention, "options": ATTENTION[args.attention], "steps": step,
            "epochs": step / steps_per_epoch, "seconds": time.time() - start, "width": args.width,
            "depth": args.depth, "heads": args.heads, "seed": args.seed, "command": " ".join(sys.argv),
            "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, args.out)
    print(json.dumps(info))
    return model, info


def accuracy(model, x, y, batch=500):
    with torch.no_grad():
        right = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return right / len(x)


def layer_inputs(model, x):
    """Each layer's q, k, v (batch, heads, 197, head_dim) on images x, captured by hooks."""
    captured = []

    def hook(module, args, _out):
        h = args[0]
        qkv = nn.functional.linear(h, module.in_proj_weight, module.in_proj_bias)
        b, n, e = h.shape
        q, k, v = qkv.view(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        captured.append(tuple(t.contiguous().numpy() for t in (q, k, v)))

    handles = [block.attn.register_forward_hook(hook) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return captured


def selections_for(kind):
    """(label, selection spec) of every selection a model is evaluated with."""
    out = [("full", "full")]
    budgets = (8, 16, 32, 64, 128)
    if kind == "poly":
        out = [("full", "full+kernel:poly+p:4")]
        out += [(f"U_eps eps={eps}", f"leverage+eps:{eps}+kernel:poly+p:4") for eps in (0.01, 0.05, 0.1)]
        out += [(f"leverage top-{k}", f"leverage:{k}+kernel:poly+p:4") for k in (16, 32, 64)]
        return out
    if kind == "leverage":
        budgets = (32,)
    for k in budgets:
        out.append((f"leverage top-{k}", f"leverage:{k}"))
        if kind == "softmax":
            out += [(f"window {k}", f"window:{k // 2}"), (f"random {k}", f"random:{k}"),
                    (f"exact top-{k}", f"topk:{k}"), (f"cluster top-{k}", f"cluster:{k}")]
    return out


def evaluate(paths, out_path, test_images=10000, probe_images=256, only=None):
    x, y = load("test")
    x, y = x[:test_images], y[:test_images]
    results = []
    for path in paths:
        saved = torch.load(path)
        info = saved["info"]
        # A checkpoint names its training selection by spec (older ones by keywords: the same selection).
        trained = info["options"] if isinstance(info["options"], str) else ATTENTION[info["attention"]]
        model = ViT(info["width"], info["depth"], info["heads"], trained)
        model.load_state_dict(saved["state"])
        model.eval()
        for label, spec in selections_for(info["attention"]):
            if only and label not in only:
                continue
            model.set_selection(spec)
            t0 = time.time()
            acc = accuracy(model, x, y)
            row = {"model": info["attention"], "selection": label, "accuracy": acc, "seconds": time.time() - t0,
                   "test_images": len(x), "seed": info["seed"], "train_steps": info["steps"],
                   "train_epochs": info["epochs"], "train_seconds": info["seconds"], "torch": torch.__version__,
                   "layers": []}
            for q, k, v in layer_inputs(model, x[:probe_images]):
                ev = levattn.evaluate(q, k, v, [spec])
                sets = levattn.select_keys(q.reshape(-1, 197, q.shape[-1]), k.reshape(-1, 197, k.shape[-1]), spec)
                size = np.mean([len(s) for s in sets.shared_keys]) if sets.shared_keys else None
                row["layers"].append({"softmax_mass": float(np.mean([e["softmax_mass"] for e in ev])),
                                      "output_error": float(np.mean([e["output_error"] for e in ev])),
                                      "keys_per_query": float(np.mean([e["keys_per_query"] for e in ev])),
                                      "shared_size": None if size is None else float(size)})
            print(f"{info['attention']:9s} seed {info['seed']} {label:22s} accuracy {acc:.4f} "
                  + " ".join(f"L{i}: mass {l['softmax_mass']:.3f} err {l['output_error']:.3f}"
                             for i, l in enumerate(row["layers"])), flush=True)
            results.append(row)
            if out_path:  # after every row, so that a stopped run keeps what it measured
                with open(out_path, "w") as f:
                    json.dump(results, f, indent=1)
    return results


def quick():
    """A small model, a subset, one short epoch: the loss falls and the evaluation runs."""
    args = argparse.Namespace(attention="leverage", minutes=5, epochs=1, batch=64, lr=3e-3, width=32, depth=2,
                              heads=2, seed=0, subset=2048, out=None)
    model, info = train(args)
    assert info["last_loss"] < info["first_loss"], info
    x, y = load("test")
    model.set_selection("leverage:16")
    acc = accuracy(model, x[:512], y[:512])
    layers = layer_inputs(model, x[:8])
    ev = levattn.evaluate(*layers[0], ["leverage:16", "topk:16"])
    assert len(layers) == 2 and len(ev) == 2 * 8 * 2 and 0.0 <= acc <= 1.0
    print(json.dumps({"quick": "ok", "accuracy_512": acc, "first_loss": info["first_loss"],
                      "last_loss": info["last_loss"]}))
    return info, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--attention", choices=sorted(ATTENTION), required=True)
    t.add_argument("--minutes", type=float, default=12.0, help="stop after this much training time")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--subset", type=int, default=0, help="train on the first N images only")
    t.add_argument("--out", required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("models", nargs="+")
    e.add_argument("--out")
    e.add_argument("--test-images", type=int, default=10000)
    e.add_argument("--only", nargs="+", help="evaluate only the selections with these labels")
    sub.add_parser("quick")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.command == "train":
        train(args)
    elif args.command == "evaluate":
        evaluate(args.models, args.out, args.test_images, only=args.only)
    else:
        quick()


if __name__ == "__main__":
    main()
