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

from .common import (accuracy, add_budget_argument, apply_budget, available_inits, config_of, estimate_step_seconds,
                     finish, fmt_minutes, fmt_ms, forward_times, group_runs, mean_std, n_params, save_progress,
                     train_classifier)
from .models.lowrank import LowRankLinear, matched_rank

NAME = "vit"


#: named budgets (``--budget``): "small" is the earlier scaled run (results/vit), "full" is issue #18's budget
#: where the models converge (full training set, 10 epochs, 4 blocks, dense tuned over 3 learning rates, a
#: parameter-matched dense, the STL learning-rate check); options given explicitly override the preset
PRESETS = {
    "small": dict(train_limit=8000, epochs=3, batch_size=128, lr=2e-3, dim=128, depth=2, patch=7, dense_lrs=[],
                  dense_dims=[], stl_lrs=[], codec_lr_mults=[], lr_check_inits=["random"], row_check_inits=[],
                  out="results/vit"),
    "full": dict(train_limit=60000, epochs=10, batch_size=128, lr=2e-3, dim=96, depth=4, patch=7,
                 dense_lrs=[1e-3, 4e-3], dense_dims=["matched"], stl_lrs=[1e-3, 4e-3], codec_lr_mults=[0.1, 3.0],
                 lr_check_inits=["random", "als"], row_check_inits=["random"], out="results/vit/full"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 1000 images, 1 epoch)")
    add_budget_argument(p, PRESETS, "full")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-limit", type=int, default=None, help="training images (first N of 60000)")
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate of every model without @lr=")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=None, help="patch size (28/7 = 4x4 = 16 tokens, 28/4 = 49 tokens)")
    p.add_argument("--tile", type=int, default=4)
    p.add_argument("--rank", type=int, default=24)
    p.add_argument("--dense-lrs", type=float, nargs="*", default=None,
                   help="extra dense baselines trained at these learning rates (tuning check for the dense model)")
    p.add_argument("--dense-dims", nargs="*", default=None,
                   help="extra wider/narrower dense baselines; 'matched' = the width (multiple of --heads) whose "
                        "parameter count is closest to the STL model's")
    p.add_argument("--stl-lrs", type=float, nargs="*", default=None,
                   help="STL learning-rate check: the --lr-check-inits models also at these learning rates (stl-X@lr=)")
    p.add_argument("--codec-lr-mults", type=float, nargs="*", default=None,
                   help="STL learning-rate check: the --lr-check-inits models with the codec parameters enc_x/dec at "
                        "lr x M (w_hat and bias at lr; stl-X@codec=M)")
    p.add_argument("--lr-check-inits", nargs="*", default=None, help="init families of the STL learning-rate check")
    p.add_argument("--row-check-inits", nargs="*", default=None,
                   help="row-mixing control: these init families also as stl-X@rows=1 (1 x t strips that never mix "
                        "tokens, rank scaled by 1/t: the same core MACs, 1/t of the encode/decode MACs and of w_hat)")
    p.add_argument("--only", nargs="+", default=None,
                   help="train only these model kinds (an untrained dense model is the inference-timing reference "
                        "when dense is not among them; --estimate lists the kinds)")
    p.add_argument("--inits", nargs="+", default=None,
                   help="STL init families (default: every registered family, e.g. random als truncate)")
    p.add_argument("--estimate", type=int, nargs="?", const=200, default=None, metavar="STEPS",
                   help="time STEPS training steps (default 200) of each selected model on 1 batch size, print the "
                        "extrapolated wall time per run and for the whole selection, train nothing")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default: results/vit for --budget small, "
                                                "results/vit/full for --budget full)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing runs.json (records of the same seed and model are replaced)")


def _quick(args) -> None:
    args.seeds = args.seeds[:1]
    args.train_limit, args.test_limit, args.epochs = min(args.train_limit, 1000), min(args.test_limit, 500), 1


def parse_kind(kind: str) -> tuple[str, dict]:
    """'stl-als@codec=0.1' -> ('stl-als', {'codec': 0.1}); 'dense@dim=120' -> ('dense', {'dim': 120.0}).

    ``@rows=n``: STL with row_tile n (n rows of a sample per activation tile) and rank * n / tile, so that the
    core MACs stay those of the default (row_tile = tile) model (encode/decode MACs and w_hat scale with the
    rank: n / tile of the default's)."""
    base, *opts = kind.split("@")
    out = {}
    for o in opts:
        k, _, v = o.partition("=")
        if k not in ("lr", "dim", "codec", "rows") or not v:
            raise ValueError(f"model kind {kind!r}: options look like @lr=X, @dim=N, @codec=M or @rows=N")
        out[k] = float(v)
    return base, out


def model_kinds(args, inits: list[str]) -> list[str]:
    kinds = (["dense"] + [f"dense@lr={lr:g}" for lr in args.dense_lrs] + [f"dense@dim={d}" for d in args.dense_dims]
             + [f"stl-{i}" for i in inits] + ["lowrank"])
    for i in args.lr_check_inits:
        kinds += [f"stl-{i}@lr={lr:g}" for lr in args.stl_lrs if lr != args.lr]
        kinds += [f"stl-{i}@codec={m:g}" for m in args.codec_lr_mults if m != 1]
    kinds += [f"stl-{i}@rows=1" for i in getattr(args, "row_check_inits", None) or []]
    if args.only:
        unknown = [k for k in args.only if k not in kinds]
        if unknown:
            raise ValueError(f"--only {unknown}: not among this budget's model kinds {kinds}")
        kinds = [k for k in kinds if k in args.only]
    return kinds


def matched_dim(args, seed: int, tokens: int) -> int:
    """Dense width (a multiple of --heads) whose parameter count is closest to the STL (random init) model's."""
    target = n_params(build("stl-random", args, seed, tokens))
    best = None
    for d in range(args.heads, 4 * args.dim + 1, args.heads):
        n = n_params(ViT(image_size=28, patch_size=args.patch, dim=d, depth=args.depth, heads=args.heads, mlp_ratio=2.0))
        if best is None or abs(n - target) < best[1]:
            best = (d, abs(n - target))
    return best[0]


def param_groups(model, codec_mult: float) -> list[dict] | None:
    """STL codec parameters (enc_x, dec) at lr x codec_mult, everything else at lr; None when codec_mult is 1."""
    if codec_mult == 1:
        return None
    codec = [p for m in model.modules() if isinstance(m, STLinear) for p in (m.enc_x, m.dec)]
    ids = {id(p) for p in codec}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": codec, "lr_scale": codec_mult}]


def build(kind: str, args, seed: int, tokens: int):
    base, opts = parse_kind(kind)
    torch.manual_seed(seed)
    if base == "dense":
        make = dense_linear
    elif base.startswith("stl-"):
        rows = int(opts.get("rows", args.tile))
        rank = args.rank * rows // args.tile
        if rows < 1 or rank < 1 or args.rank * rows % args.tile:
            raise ValueError(f"model kind {kind!r}: rows must be >= 1 with rank {args.rank} * rows divisible by tile "
                             f"{args.tile}")
        alg = resolve(base[4:], rows, args.tile, args.tile, rank, seed)  # once per model (ALS is slow)
        make = lambda i, o: STLinear(i, o, tile=args.tile, rank=rank, row_tile=rows, init=alg, seed=seed)  # noqa: E731
    elif base == "lowrank":
        def make(i, o):
            probe = STLinear(i, o, tile=args.tile, rank=args.rank, init="random")
            macs = cost.count(probe, torch.zeros(1, tokens, i)).macs
            return LowRankLinear(i, o, matched_rank(i, o, macs / tokens))
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    dim = int(opts["dim"]) if "dim" in opts else args.dim
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


def resolve_args(args) -> None:
    apply_budget(args, PRESETS)
    if args.quick:
        _quick(args)
        if args.out == PRESETS[args.budget]["out"]:  # smoke runs never write into results/
            import tempfile

            args.out = tempfile.mkdtemp(prefix="vit-quick-")
    if 28 % args.patch:
        raise ValueError(f"--patch must divide 28, got {args.patch}")


def run(args) -> int:
    from .data.fashion_mnist import load_fashion_mnist

    resolve_args(args)
    torch.set_num_threads(args.threads)
    tokens = (28 // args.patch) ** 2
    if "matched" in args.dense_dims:
        d = str(matched_dim(args, args.seeds[0], tokens))
        args.dense_dims = [d if x == "matched" else x for x in args.dense_dims]
        if args.only:
            args.only = [f"dense@dim={d}" if k == "dense@dim=matched" else k for k in args.only]
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_root, args.train_limit, args.test_limit)
    inits = args.inits or available_inits()
    kinds = model_kinds(args, inits)
    print(f"Fashion-MNIST {len(x_tr)} train / {len(x_te)} test, ViT d={args.dim} depth={args.depth} "
          f"patch={args.patch} ({tokens} tokens), {args.epochs} epochs; budget {args.budget}; models {kinds}; "
          f"seeds {args.seeds}")
    if args.estimate is not None:
        return estimate(args, kinds, x_tr, y_tr, tokens)
    records = []
    progress_meta = {"config": config_of(args), "kinds": kinds}
    for seed in args.seeds:
        models = {}
        for kind in kinds:
            model = build(kind, args, seed, tokens)
            opts = parse_kind(kind)[1]
            lr = opts.get("lr", args.lr)
            codec = opts.get("codec", 1.0)
            secs = train_classifier(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size,
                                    lr=lr, seed=seed, desc=f"{kind} s{seed}", param_groups=param_groups(model, codec))
            rec = {"seed": seed, "model": kind, "budget": args.budget, "lr": lr, "codec_lr_mult": codec,
                   "test_accuracy": accuracy(model, x_te, y_te), "params": n_params(model), "train_seconds": secs,
                   "epochs": args.epochs, "train_images": len(x_tr), **linear_costs(model, x_te[:2])}
            print(f"  seed {seed} {kind:16s} acc {rec['test_accuracy']:.4f}  train {secs:.0f}s")
            records.append(rec)
            save_progress(args, records, progress_meta)  # every finished run is on disk
            models[kind] = model
        if "dense" not in models:  # forward time does not depend on the weights: an untrained reference
            models["dense"] = build("dense", args, seed, tokens)
        times = forward_times(models, x_te[:256])
        dense_train = next((r["train_seconds"] for r in records if r["seed"] == seed and r["model"] == "dense"), None)
        for rec in records:
            if rec["seed"] == seed:
                rec["forward_ratio_vs_dense"] = times[rec["model"]] / times["dense"]
                rec["train_ratio_vs_dense"] = rec["train_seconds"] / dense_train if dense_train else None
    meta = {"config": config_of(args), "kinds": kinds,
            "scale": f"Fashion-MNIST first {len(x_tr)} train images, {len(x_te)} test images; ViT dim {args.dim}, "
                     f"depth {args.depth}, {args.heads} heads, patch {args.patch} ({tokens} tokens), mlp ratio 2; "
                     f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} one-cycle, "
                     f"{args.threads} thread(s) (budget {args.budget})"}
    return finish(args, records, meta, plot, table)


def estimate(args, kinds, x_tr, y_tr, tokens) -> int:
    """Time ``args.estimate`` training steps per model kind and extrapolate to a whole run (nothing is written)."""
    import math

    import torch.nn.functional as F

    steps_per_run = args.epochs * math.ceil(len(x_tr) / args.batch_size)
    total = 0.0
    print(f"timing {args.estimate} steps of batch {args.batch_size} per model on {torch.get_num_threads()} thread(s); "
          f"a run is {steps_per_run} steps ({args.epochs} epochs of {len(x_tr)} images)")
    for kind in kinds:
        model = build(kind, args, 0, tokens)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        state = {"i": 0}

        def step(model=model, opt=opt):
            i = state["i"] = (state["i"] + args.batch_size) % max(1, len(x_tr) - args.batch_size)
            loss = F.cross_entropy(model(x_tr[i: i + args.batch_size]), y_tr[i: i + args.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = estimate_step_seconds(step, args.estimate)
        total += sec * steps_per_run
        print(f"  {kind:22s} {1000 * sec:6.0f} ms/step -> {fmt_minutes(sec * steps_per_run)} per run (+ evaluation)")
    print(f"estimated total for {len(kinds)} models x {len(args.seeds)} seed(s): {fmt_minutes(total * len(args.seeds))}")
    return 0


def _fmt_or_dash(vals) -> str:
    """mean +- std, or "-" without values (a run recorded by a progress write, or killed, before its timing)."""
    return fmt_ms(vals, 2) if vals else "-"


def table(records: list[dict]) -> str:
    groups = group_runs(records, dense_first=True)
    dense_macs = mean_std([r["linear_macs_per_image"] for r in groups.get("dense", records)])[0]
    dense_secs = {r["seed"]: r["train_seconds"] for r in groups.get("dense", [])}

    def train_ratios(rs):  # against the dense run of the same seed (batches of --only runs may lack one)
        return [r["train_seconds"] / dense_secs[r["seed"]] for r in rs if dense_secs.get(r["seed"])]

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
            f"| {_fmt_or_dash(train_ratios(rs))} | {_fmt_or_dash([r['forward_ratio_vs_dense'] for r in rs if 'forward_ratio_vs_dense' in r])} |")
    return "\n".join(lines)


def _family(kind: str) -> str:
    """dense, lowrank or stl-<init>: the colour group of a model kind (its @-options are variants of it)."""
    base = kind.split("@")[0]
    return "dense" if base == "dense" else base


def plot(records: list[dict], out: Path) -> Path:
    """Two panels. Left: accuracy against linear-layer MACs per image (mean +- std over seeds, seeds as dots) for
    each family at its default setting; STL models all have the same MACs, so they stack in one column. Right:
    every variant's accuracy (seeds as dots), grouped by family, with the best dense mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(records, dense_first=True)
    families = list(dict.fromkeys(_family(k) for k in groups))
    cmap = plt.get_cmap("tab10")
    color = {f: cmap(i % 10) for i, f in enumerate(families)}
    acc = {k: [r["test_accuracy"] for r in rs] for k, rs in groups.items()}
    n_seeds = sorted({len(v) for v in acc.values()})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.28 * max(12, len(groups))),
                                 gridspec_kw={"width_ratios": [1, 1.3]})
    for kind, rs in groups.items():
        if "@" in kind and not kind.startswith("dense@dim="):
            continue  # learning-rate / codec checks: right panel only
        x = mean_std([r["linear_macs_per_image"] for r in rs])[0] / 1e6
        m, sd = mean_std(acc[kind])
        ax.errorbar([x], [m], yerr=[sd], fmt="s" if kind.startswith("dense@dim=") else "o", capsize=4,
                    color=color[_family(kind)], label=f"{kind} ({len(rs)} seeds)")
        ax.scatter([x] * len(rs), acc[kind], s=10, alpha=0.5, color=color[_family(kind)])
    ax.set_xlabel("linear-layer MMACs per image (incl. STL encode/decode)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs cost (default settings)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    kinds = list(groups)[::-1]  # top to bottom in the dense-first order
    dense_means = [mean_std(acc[k])[0] for k in groups if _family(k) == "dense" and not k.startswith("dense@dim=")]
    for y, kind in enumerate(kinds):
        m, sd = mean_std(acc[kind])
        variant = "@" in kind and not kind.startswith("dense@dim=")
        bx.errorbar([m], [y], xerr=[sd], fmt="o", capsize=3, color=color[_family(kind)],
                    mfc="white" if variant else color[_family(kind)])
        bx.scatter(acc[kind], [y] * len(acc[kind]), s=10, alpha=0.5, color=color[_family(kind)])
    if dense_means:
        bx.axvline(max(dense_means), ls="--", color="gray", lw=1, label="best dense (mean)")
        bx.legend(fontsize=7, loc="lower right")
    bx.set_yticks(range(len(kinds)))
    bx.set_yticklabels(kinds, fontsize=7)
    bx.set_xlabel("test accuracy (mean +- std, dots: seeds; hollow: lr / codec checks)")
    bx.set_title("every variant")
    bx.grid(alpha=0.3, axis="x")
    seeds = "/".join(map(str, n_seeds))
    fig.suptitle(f"ViT on Fashion-MNIST: dense vs STL (t=4, r=24) vs low rank ({seeds} seeds per model)")
    fig.tight_layout()
    path = out / "accuracy_vs_macs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
