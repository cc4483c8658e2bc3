"""``python experiments/run.py vit``: the STL paper's ViT experiment, scaled to Fashion-MNIST on a CPU.

A small ViT (strassenkit._models.vit.ViT; every linear layer including patch embedding and head built by
the factory) trained from scratch with the same budget as:
- ``dense``: nn.Linear everywhere;
- ``stl-<init>``: STLinear t=4 r=24 (row_tile 4: tiles of 4 consecutive tokens inside one image) for every
  registered init family (``random`` is the baseline; ``als``, ``truncate``, ``polynomial``... when
  strassenkit.algorithms.families() lists them);
- ``lowrank``: each linear factorized as K -> k -> N with k chosen so its MACs match the STL layer's
  total MACs (core + encode + decode) on the same input.
Reported per run: test accuracy, parameters, linear-layer MACs (core/encode/decode, from cost.count),
training seconds and the forward-time ratio against the dense model of the same seed (median of
interleaved repeats after warm-up).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from strassenkit import cost
from strassenkit._models.vit import ViT, dense_linear
from strassenkit.algorithms import resolve
from strassenkit.nn import STLinear

from .common import (accuracy, available_inits, config_of, finish, fmt_ms, forward_times, group_runs, mean_std,
                     n_params, train_classifier)
from .models.lowrank import LowRankLinear, matched_rank

NAME = "vit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 1000 images, 1 epoch)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-limit", type=int, default=8000, help="training images (first N of 60000)")
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=7, help="patch size (28/7 = 4x4 = 16 tokens)")
    p.add_argument("--tile", type=int, default=4)
    p.add_argument("--rank", type=int, default=24)
    p.add_argument("--dense-lrs", type=float, nargs="*", default=[],
                   help="extra dense baselines trained at these learning rates (tuning check for the dense model)")
    p.add_argument("--dense-dims", type=int, nargs="*", default=[],
                   help="extra wider/narrower dense baselines (e.g. parameter-matched to STL)")
    p.add_argument("--only", nargs="+", default=None,
                   help="train only these model kinds (dense is always trained too, as the timing reference)")
    p.add_argument("--inits", nargs="+", default=None,
                   help="STL init families (default: every registered family, e.g. random als truncate)")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/vit")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing runs.json (records of the same seed and model are replaced)")


def _quick(args) -> None:
    args.seeds = args.seeds[:1]
    args.train_limit, args.test_limit, args.epochs = min(args.train_limit, 1000), min(args.test_limit, 500), 1


def build(kind: str, args, seed: int, tokens: int):
    torch.manual_seed(seed)
    if kind == "dense" or kind.startswith("dense@"):
        make = dense_linear
    elif kind.startswith("stl-"):
        alg = resolve(kind[4:], args.tile, args.tile, args.tile, args.rank, seed)  # once per model (ALS is slow)
        make = lambda i, o: STLinear(i, o, tile=args.tile, rank=args.rank, init=alg, seed=seed)  # noqa: E731
    elif kind == "lowrank":
        def make(i, o):
            probe = STLinear(i, o, tile=args.tile, rank=args.rank, init="random")
            macs = cost.count(probe, torch.zeros(1, tokens, i)).macs
            return LowRankLinear(i, o, matched_rank(i, o, macs / tokens))
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    dim = int(kind.split("=")[1]) if kind.startswith("dense@dim=") else args.dim
    return ViT(image_size=28, patch_size=args.patch, dim=dim, depth=args.depth, heads=args.heads,
               mlp_ratio=2.0, make_linear=make)


def linear_costs(model, x) -> dict:
    rows = [r for r in cost.count(model, x).layers if r.kind in ("linear", "stl")]
    n = len(x)
    return {
        "linear_macs_per_image": sum(r.macs for r in rows) / n,
        "linear_macs_core_per_image": sum(r.macs_core for r in rows) / n,
        "linear_macs_encdec_per_image": sum(r.macs_encode + r.macs_decode for r in rows) / n,
        "linear_params": sum(r.params for r in rows),
    }


def run(args) -> int:
    from .data.fashion_mnist import load_fashion_mnist

    if args.quick:
        _quick(args)
    torch.set_num_threads(args.threads)
    if 28 % args.patch:
        raise ValueError(f"--patch must divide 28, got {args.patch}")
    tokens = (28 // args.patch) ** 2
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_root, args.train_limit, args.test_limit)
    inits = args.inits or available_inits()
    kinds = ["dense"] + [f"dense@lr={lr:g}" for lr in args.dense_lrs] + [f"dense@dim={d}" for d in args.dense_dims] + [f"stl-{i}" for i in inits] + ["lowrank"]
    if args.only:
        kinds = ["dense"] + [k for k in kinds if k in args.only and k != "dense"]
    print(f"Fashion-MNIST {len(x_tr)} train / {len(x_te)} test, ViT d={args.dim} depth={args.depth} "
          f"patch={args.patch} ({tokens} tokens), {args.epochs} epochs; models {kinds}; seeds {args.seeds}")
    records = []
    for seed in args.seeds:
        models = {}
        for kind in kinds:
            model = build(kind, args, seed, tokens)
            lr = float(kind.split("=")[1]) if kind.startswith("dense@lr=") else args.lr
            secs = train_classifier(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size,
                                    lr=lr, seed=seed, desc=f"{kind} s{seed}")
            rec = {"seed": seed, "model": kind, "lr": lr, "test_accuracy": accuracy(model, x_te, y_te),
                   "params": n_params(model), "train_seconds": secs, **linear_costs(model, x_te[:2])}
            print(f"  seed {seed} {kind:16s} acc {rec['test_accuracy']:.4f}  train {secs:.0f}s")
            records.append(rec)
            models[kind] = model
        times = forward_times(models, x_te[:256])
        dense_train = next(r["train_seconds"] for r in records if r["seed"] == seed and r["model"] == "dense")
        for rec in records:
            if rec["seed"] == seed:
                rec["forward_ratio_vs_dense"] = times[rec["model"]] / times["dense"]
                rec["train_ratio_vs_dense"] = rec["train_seconds"] / dense_train
    meta = {"config": config_of(args), "kinds": kinds,
            "scale": f"Fashion-MNIST first {len(x_tr)} train images, {len(x_te)} test images; ViT dim {args.dim}, "
                     f"depth {args.depth}, {args.heads} heads, patch {args.patch} ({tokens} tokens), mlp ratio 2; "
                     f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} one-cycle, "
                     f"{args.threads} thread(s)"}
    return finish(args, records, meta, plot, table)


def table(records: list[dict]) -> str:
    groups = group_runs(records, dense_first=True)
    dense_macs = mean_std([r["linear_macs_per_image"] for r in groups.get("dense", records)])[0]
    lines = ["| model | seeds | test accuracy | params | linear MACs/image (core + enc/dec) | MAC reduction vs dense "
             "| train time / dense | inference time / dense |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, rs in groups.items():
        macs = mean_std([r["linear_macs_per_image"] for r in rs])[0]
        core = mean_std([r["linear_macs_core_per_image"] for r in rs])[0]
        encdec = mean_std([r["linear_macs_encdec_per_image"] for r in rs])[0]
        lines.append(
            f"| {kind} | {len(rs)} | {fmt_ms([r['test_accuracy'] for r in rs])} | {rs[0]['params']:,} "
            f"| {macs:,.0f} ({core:,.0f} + {encdec:,.0f}) | {dense_macs / macs:.2f}x "
            f"| {fmt_ms([r['train_ratio_vs_dense'] for r in rs], 2)} | {fmt_ms([r['forward_ratio_vs_dense'] for r in rs], 2)} |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    span = max(r["linear_macs_per_image"] for r in records) / 1e6
    for i, (kind, rs) in enumerate(groups.items()):
        # small horizontal offsets so models with equal MACs do not hide each other
        macs = mean_std([r["linear_macs_per_image"] for r in rs])[0] / 1e6 + (i - len(groups) / 2) * 0.006 * span
        m, s = mean_std([r["test_accuracy"] for r in rs])
        ax.errorbar([macs], [m], yerr=[s], fmt="o", capsize=4, label=kind)
        ax.scatter([macs] * len(rs), [r["test_accuracy"] for r in rs], s=8, alpha=0.4, color="gray")
    ax.set_xlabel("linear-layer MMACs per image (incl. encode/decode; points offset slightly)")
    ax.set_ylabel("test accuracy")
    ax.set_title("ViT on Fashion-MNIST: dense vs STL (t=4, r=24) vs low rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_vs_macs.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
