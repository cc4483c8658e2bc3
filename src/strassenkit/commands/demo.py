"""``strassenkit demo`` / ``make demo``: a small ViT on scikit-learn's digits, dense vs STL.

Trains the same ViT twice per seed (dense, then with the linear layers of its transformer blocks as
STLinear with t=4, r=24) with the same budget, and prints one table: test accuracy (mean +- std over
seeds), parameters, MACs of the linear layers (core, encode and decode included), the linear-layer MAC
reduction, and two time ratios STL / dense measured in the same process, models interleaved, median
of repeats after warm-up: the inference forward over the test set (``torch.no_grad``) and one training
step (forward, backward, AdamW) on a batch. Results also go to ``results/demo/summary.json``.

Which layers: ``--stl-layers blocks`` (default) converts the block linears (attention qkv and output
projection, both MLP layers) and keeps the patch embedding and the classifier dense, as the STL paper
does for its ViT and as ``strassenify_`` keeps output heads: the 4 -> 128 patch embedding has a single
tile column and the 128 -> 10 head three, where encode/decode cost more than the core saves.
``--stl-layers all`` converts every linear layer (the demo's table before 2026-12).

Threads: training a model this small is dominated by per-op overhead, and PyTorch's default of
2 threads was several times slower than 1 on the 2-core machines we use, so the demo runs with
1 thread (``--threads`` to change it).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from .. import cost
from .._models.digits import load_digits_split
from .._models.training import accuracy, forward_times, train_classifier, train_step_times
from .._models.vit import ViT, dense_linear
from ..functional.ops import active_backend
from ..nn.stlinear import STLinear


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--tile", type=int, default=4)
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--init", default="random", help="STL init: random, a catalogue name, or a family (als, ...)")
    parser.add_argument("--dim", type=int, default=128, help="ViT width")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stl-layers", choices=("blocks", "all"), default="blocks",
                        help="blocks: the transformer blocks' linears (patch embedding and head dense); all: every linear")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40,
                        help="timed forward passes and training steps per model (medians are reported)")
    parser.add_argument("--out", default="results/demo", help="folder for summary.json ('' to skip writing)")


def build_model(kind: str, args, seed: int) -> ViT:
    torch.manual_seed(seed)
    if kind == "dense":
        make = dense_linear
    else:
        make = lambda i, o: STLinear(i, o, tile=args.tile, rank=args.rank, init=args.init, seed=seed)  # noqa: E731
    outer = dense_linear if kind != "dense" and getattr(args, "stl_layers", "blocks") == "blocks" else None
    return ViT(image_size=8, patch_size=2, dim=args.dim, depth=args.depth, heads=4, mlp_ratio=2.0, make_linear=make,
               make_head=outer, make_embed=outer)


def linear_cost(model, x) -> dict:
    rep = cost.count(model, x)
    rows = [r for r in rep.layers if r.kind in ("linear", "stl")]
    return {
        "macs": sum(r.macs for r in rows),
        "macs_core": sum(r.macs_core for r in rows),
        "macs_encode_decode": sum(r.macs_encode + r.macs_decode for r in rows),
        "dense_macs": sum(r.dense_macs for r in rows),
    }


def run(args) -> int:
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images (8x8), ViT d={args.dim} depth={args.depth}, "
          f"16 tokens, STL t={args.tile} r={args.rank} init={args.init!r} on {args.stl_layers} linears, seeds {args.seeds}, "
          f"threads {args.threads}")
    records = []
    for seed in args.seeds:
        models = {}
        for kind in ("dense", "stl"):
            model = build_model(kind, args, seed)
            train_s = train_classifier(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       seed=seed, desc=f"{kind} seed {seed}", pct_start=0.1)
            models[kind] = model
            records.append({
                "seed": seed, "model": kind, "test_accuracy": accuracy(model, x_te, y_te),
                "params": sum(p.numel() for p in model.parameters()), "train_seconds": train_s,
                **linear_cost(model, x_te[:1]),
            })
        times = forward_times(models, x_te, repeats=args.repeats, inference=True)
        steps = train_step_times(models, x_tr, y_tr, args.batch_size, repeats=args.repeats)
        for rec in records[-2:]:
            rec["forward_ratio_vs_dense"] = times[rec["model"]] / times["dense"]
            rec["train_step_ratio_vs_dense"] = steps[rec["model"]] / steps["dense"]
    print(format_table(records))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "stl_kernels": active_backend(torch.float32, "cpu")}
        (out / "summary.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=2))
        print(f"wrote {out / 'summary.json'}")
    return 0


def _ms(vals) -> str:
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.4f} +- {s:.4f}"


def format_table(records) -> str:
    head = (f"| model | test accuracy (mean +- std, {len({r['seed'] for r in records})} seeds) | params | "
            f"linear MACs / image (incl. enc/dec) | of which enc/dec | MAC reduction | inference forward time STL/dense | "
            f"training step time STL/dense |")
    lines = [head, "|" + "---|" * 8]
    for kind in ("dense", "stl"):
        rs = [r for r in records if r["model"] == kind]
        macs = rs[0]["macs"]
        red = rs[0]["dense_macs"] / macs
        ratio = statistics.median(r["forward_ratio_vs_dense"] for r in rs)
        step = statistics.median(r.get("train_step_ratio_vs_dense", float("nan")) for r in rs)
        lines.append(
            f"| {kind} | {_ms([r['test_accuracy'] for r in rs])} | {rs[0]['params']:,} | {macs:,} | "
            f"{rs[0]['macs_encode_decode']:,} | {red:.2f}x | {ratio:.2f} | {step:.2f} |"
        )
    return "\n".join(lines)
