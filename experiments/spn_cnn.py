"""``python experiments/run.py spn_cnn``: StrassenNets' ResNet experiment, scaled to Fashion-MNIST on a CPU.

A small ResNet-style CNN (experiments.models.cnn.ResNetSmall) whose 3x3 convolutions after the stem are
SPNConv2d layers (ternary W_b and W_c, full-precision a_hat) over a sweep of budgets (out_patch p and hidden
width r = ratio * c_out), trained with and without knowledge distillation from the dense model of the same
seed (the teacher). The stem (one input channel) and the 16 -> 10 head stay dense and full precision in every
model, as StrassenNets kept first/last layers. Training: the first ``--full-frac`` of the steps in the
full-precision phase, the rest in the ternary phase (straight-through); evaluated ternary.

Reported per run: test accuracy, multiplications and additions per image (convolutions and whole model),
model size in bits (2 bits per ternary entry, 32 bits otherwise), training seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from strassenkit.nn import SPNConv2d, set_phase
from strassenkit.train import distillation_loss

from .common import (accuracy, arithmetic_costs, config_of, finish, fmt_ms, mean_std, model_bits, n_params,
                     train_classifier)
from .models.cnn import ResNetSmall, dense_conv

NAME = "spn_cnn"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 600 images, 1 epoch, 2 budgets)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-limit", type=int, default=6000)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=8, help="channels of the first stage (second stage: 2x)")
    p.add_argument("--budgets", nargs="+", default=["1:0.5", "1:1", "2:1", "2:2"],
                   help="SPN budgets as out_patch:ratio with r = ratio * c_out (default 1:0.5 1:1 2:1 2:2)")
    p.add_argument("--full-frac", type=float, default=0.34, help="fraction of steps in the full-precision phase")
    p.add_argument("--kd-lambda", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/spn_cnn")
    p.add_argument("--append", action="store_true", help="merge into an existing runs.json")


def parse_budget(text: str) -> tuple[int, float]:
    try:
        p, ratio = text.split(":")
        p, ratio = int(p), float(ratio)
    except ValueError:
        raise ValueError(f"budget {text!r} must look like OUT_PATCH:RATIO, e.g. 2:1") from None
    if p < 1 or ratio <= 0:
        raise ValueError(f"budget {text!r}: out_patch must be >= 1 and ratio > 0")
    return p, ratio


def build(kind: str, args, seed: int):
    torch.manual_seed(seed)
    if kind == "dense":
        return ResNetSmall(args.width, make_conv=dense_conv)
    p, ratio = parse_budget(kind.split("@")[1])
    make = lambda ci, co, s: SPNConv2d(ci, co, 3, s, 1, rank=max(1, round(ratio * co)), out_patch=p, bias=False)  # noqa: E731
    return ResNetSmall(args.width, make_conv=make)


def run(args) -> int:
    from .data.fashion_mnist import load_fashion_mnist

    if args.quick:
        args.seeds = args.seeds[:1]
        args.train_limit, args.test_limit, args.epochs = min(args.train_limit, 600), min(args.test_limit, 500), 1
        args.budgets = args.budgets[:1] + args.budgets[-1:]
    torch.set_num_threads(args.threads)
    for b in args.budgets:
        parse_budget(b)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_root, args.train_limit, args.test_limit)
    print(f"Fashion-MNIST {len(x_tr)} train / {len(x_te)} test, ResNetSmall width {args.width}, {args.epochs} epochs, "
          f"budgets {args.budgets}, seeds {args.seeds}")
    kd = lambda s, t, y: distillation_loss(s, y, t, lam=args.kd_lambda, temperature=args.kd_temperature)  # noqa: E731
    records = []
    for seed in args.seeds:
        teacher = build("dense", args, seed)
        secs = train_classifier(teacher, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                seed=seed, desc=f"dense s{seed}")
        records.append(_record(teacher, "dense", None, False, seed, secs, x_te, y_te))
        print(f"  seed {seed} dense acc {records[-1]['test_accuracy']:.4f} ({secs:.0f}s)")
        teacher.eval()
        for budget in args.budgets:
            for use_kd in (False, True):
                kind = f"spn@{budget}"
                model = build(kind, args, seed)
                set_phase(model, "full")

                def on_step(step, total, model=model):
                    if step == int(args.full_frac * total):
                        set_phase(model, "ternary")

                secs = train_classifier(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, seed=seed, desc=f"{kind}{'+kd' if use_kd else ''} s{seed}",
                                        teacher=teacher if use_kd else None, kd_loss=kd, on_step=on_step)
                set_phase(model, "ternary")
                records.append(_record(model, kind, budget, use_kd, seed, secs, x_te, y_te))
                print(f"  seed {seed} {kind}{' KD' if use_kd else ''} acc {records[-1]['test_accuracy']:.4f} ({secs:.0f}s)")
    meta = {"config": config_of(args),
            "scale": f"Fashion-MNIST first {len(x_tr)} train images, {len(x_te)} test images; ResNetSmall width "
                     f"{args.width}/{2 * args.width} (stem stride 2, 14x14 then 7x7), {args.epochs} epochs, batch "
                     f"{args.batch_size}, AdamW lr {args.lr} one-cycle, full-precision phase for the first "
                     f"{args.full_frac:.0%} of steps then ternary; KD lambda {args.kd_lambda}, T {args.kd_temperature}; "
                     f"{args.threads} thread(s)"}
    return finish(args, records, meta, plot, table, key=("seed", "model", "kd"))


def _record(model, kind, budget, use_kd, seed, secs, x_te, y_te) -> dict:
    costs = arithmetic_costs(model, x_te[:1], exclude=("stem",))
    p, ratio = parse_budget(budget) if budget else (None, None)
    return {"seed": seed, "model": kind, "kd": use_kd, "out_patch": p, "rank_ratio": ratio,
            "test_accuracy": accuracy(model, x_te, y_te), "params": n_params(model), "model_bits": model_bits(model),
            "train_seconds": secs, **costs}


def _label(r) -> str:
    return r["model"] + (" +KD" if r["kd"] else "")


def table(records: list[dict]) -> str:
    groups = {}
    for r in records:
        groups.setdefault(_label(r), []).append(r)
    dense = groups.get("dense", [])
    d_conv = dense[0]["conv_mults"] if dense else float("nan")
    d_bits = dense[0]["model_bits"] if dense else float("nan")
    lines = ["| model | seeds | test accuracy | conv mults/image | conv mult reduction | conv adds/image "
             "| all mults/image | model size (KiB) | size reduction |", "|---|---|---|---|---|---|---|---|---|"]
    for label, rs in groups.items():
        r0 = rs[0]
        lines.append(f"| {label} | {len(rs)} | {fmt_ms([r['test_accuracy'] for r in rs])} | {r0['conv_mults']:,} "
                     f"| {d_conv / r0['conv_mults']:.1f}x ({100 * (1 - r0['conv_mults'] / d_conv):.1f}% fewer) "
                     f"| {r0['conv_adds']:,} | {r0['mults']:,} | {r0['model_bits'] / 8192:.1f} | {d_bits / r0['model_bits']:.1f}x |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in records:
        groups.setdefault(_label(r), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    panels = [("conv_mults", "multiplications per image (convolutions)"),
              ("conv_adds", "additions per image (convolutions)"), ("model_bits", "model size (KiB)")]
    for ax, (key, title) in zip(axes, panels):
        for kd, marker in ((False, "o"), (True, "s")):
            pts = []
            for label, rs in groups.items():
                if rs[0]["model"] == "dense" or rs[0]["kd"] != kd:
                    continue
                m, s = mean_std([r["test_accuracy"] for r in rs])
                v = rs[0][key] / (8192 if key == "model_bits" else 1)
                pts.append((v, m, s, rs[0]["model"][4:]))
            pts.sort()
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            linestyle="none", capsize=3, label="SPN ternary" + (" + KD" if kd else ""))
                for v, m, _, lab in pts:
                    ax.annotate(lab, (v, m), fontsize=7, textcoords="offset points", xytext=(3, 3))
        if "dense" in groups:
            rs = groups["dense"]
            m, s = mean_std([r["test_accuracy"] for r in rs])
            v = rs[0][key] / (8192 if key == "model_bits" else 1)
            ax.errorbar([v], [m], yerr=[s], fmt="*", markersize=12, color="k", label="full precision (dense)")
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("StrassenNets CNN on Fashion-MNIST (labels: out_patch:r/c_out)")
    fig.tight_layout()
    path = out / "accuracy_vs_cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
