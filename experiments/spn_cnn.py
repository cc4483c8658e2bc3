"""``python experiments/run.py spn_cnn``: StrassenNets' ResNet experiment, scaled to Fashion-MNIST on a CPU.

A small ResNet-style CNN (experiments.models.cnn.ResNetSmall) whose 3x3 convolutions after the stem are
SPNConv2d layers (ternary W_b and W_c, full-precision a_hat) over a sweep of budgets (out_patch p, groups g
and hidden width r = ratio * c_out), trained with and without knowledge distillation from the dense model of
the same seed (the teacher, saved in --work-dir so that KD runs can be spread over several calls). The stem
(one input channel) and the 2*width -> 10 head stay dense and full precision in every model, as StrassenNets
kept first/last layers. Training: the first ``--full-frac`` of the steps in the
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

from .common import (accuracy, add_budget_argument, apply_budget, arithmetic_costs, config_of, estimate_step_seconds,
                     finish, fmt_minutes, fmt_ms, log_x, mean_std, model_bits, n_params, save_progress,
                     train_classifier)
from .models.cnn import ResNetSmall, dense_conv

NAME = "spn_cnn"


def _sweep(patches=(1, 2), groups=(1, 4), ratios=(0.5, 1, 2)) -> list[str]:
    return [f"{p}:{r:g}:{g}" for p in patches for g in groups for r in ratios]


#: named budgets (``--budget``): "small" is the earlier scaled run (results/spn_cnn); "full" is issue #18's
#: budget: full training set, 10 epochs, width 16/32 with a width-32/64 full-precision check, the seed's sweep
#: p in {1, 2} x g in {1, 4} x r/c_out in {0.5, 1, 2}, with and without distillation
PRESETS = {
    "small": dict(train_limit=6000, epochs=3, batch_size=64, lr=3e-3, width=8, blocks=1,
                  budgets=["1:0.5", "1:1", "2:1", "2:2"], dense_widths=[], kd="both", out="results/spn_cnn"),
    "full": dict(train_limit=60000, epochs=10, batch_size=128, lr=3e-3, width=16, blocks=1, budgets=_sweep(),
                 dense_widths=[32], kd="both", out="results/spn_cnn/full"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 600 images, 1 epoch, 2 budgets)")
    add_budget_argument(p, PRESETS, "full")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--width", type=int, default=None, help="channels of the first stage (second stage: 2x)")
    p.add_argument("--blocks", type=int, default=None, help="residual blocks per stage")
    p.add_argument("--budgets", nargs="+", default=None,
                   help="SPN configs as OUT_PATCH:RATIO[:GROUPS] with r = ratio * c_out (rounded to a multiple of "
                        "GROUPS, default 1), e.g. 2:1:4")
    p.add_argument("--dense-widths", type=int, nargs="*", default=None,
                   help="extra full-precision models at these widths (is --width wide enough?)")
    p.add_argument("--kd", choices=["off", "on", "both"], default=None,
                   help="train the SPN models without distillation, with it (teacher: the dense model of the same "
                        "seed), or both")
    p.add_argument("--only", nargs="+", default=None,
                   help="train only these model kinds: dense, dense@width=W, spn@P:R[:G] (with --kd). SPN runs with "
                        "KD load the dense teacher saved in --work-dir when dense is not trained in the same call")
    p.add_argument("--full-frac", type=float, default=0.34, help="fraction of steps in the full-precision phase")
    p.add_argument("--kd-lambda", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--estimate", type=int, nargs="?", const=100, default=None, metavar="STEPS",
                   help="time STEPS training steps (default 100) per selected model, print the extrapolated wall "
                        "time per run and in total, train nothing")
    p.add_argument("--data-root", default=None)
    p.add_argument("--work-dir", default=None,
                   help="where the dense teachers are kept between calls (default runs/spn_cnn/<budget>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default results/spn_cnn for --budget small, "
                                                "results/spn_cnn/full for --budget full)")
    p.add_argument("--append", action="store_true", help="merge into an existing runs.json")


def parse_budget(text: str) -> tuple[int, float, int]:
    """'2:1:4' -> (out_patch 2, ratio 1.0, groups 4); the groups part is optional (default 1)."""
    try:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError
        p, ratio, g = int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise ValueError(f"budget {text!r} must look like OUT_PATCH:RATIO[:GROUPS], e.g. 2:1 or 2:1:4") from None
    if p < 1 or ratio <= 0 or g < 1:
        raise ValueError(f"budget {text!r}: out_patch and groups must be >= 1 and ratio > 0")
    return p, ratio, g


def spn_rank(ratio: float, c_out: int, groups: int) -> int:
    """r = ratio * c_out rounded to a multiple of groups (at least groups)."""
    return max(groups, round(ratio * c_out / groups) * groups)


def build(kind: str, args, seed: int):
    """The model of ``kind``, its 4-D weights in channels-last layout: the same convolutions, and on one CPU
    thread a training step 1.14-1.29x faster than the default layout (mkldnn's channels-last kernels; measured
    2026-12-08 on the Zen 4 for dense, spn@1:2:1 and spn@2:2:4 at the full budget's width 16)."""
    torch.manual_seed(seed)
    return _build(kind, args).to(memory_format=torch.channels_last)


def _build(kind: str, args):
    if kind == "dense":
        return ResNetSmall(args.width, make_conv=dense_conv, blocks=args.blocks)
    if kind.startswith("dense@width="):
        return ResNetSmall(int(kind.split("=")[1]), make_conv=dense_conv, blocks=args.blocks)
    p, ratio, g = parse_budget(kind.split("@")[1])

    def make(ci, co, s):
        if ci % g or co % g:
            raise ValueError(f"groups={g} must divide the channels {ci} -> {co} (choose --width accordingly)")
        return SPNConv2d(ci, co, 3, s, 1, rank=spn_rank(ratio, co, g), out_patch=p, groups=g, bias=False)

    return ResNetSmall(args.width, make_conv=make, blocks=args.blocks)


def model_kinds(args) -> list[tuple[str, bool]]:
    """(kind, use_kd) pairs of this call, in training order (dense models first: they are the teachers)."""
    kds = {"off": (False,), "on": (True,), "both": (False, True)}[args.kd]
    kinds = [("dense", False)] + [(f"dense@width={w}", False) for w in args.dense_widths]
    kinds += [(f"spn@{b}", kd) for b in args.budgets for kd in kds]
    if args.only:
        known = {k for k, _ in kinds}
        unknown = [k for k in args.only if k not in known]
        if unknown:
            raise ValueError(f"--only {unknown}: not among this budget's model kinds {sorted(known)}")
        kinds = [(k, kd) for k, kd in kinds if k in args.only]
    return kinds


def resolve_args(args) -> None:
    apply_budget(args, PRESETS)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.train_limit, args.test_limit, args.epochs = min(args.train_limit, 600), min(args.test_limit, 500), 1
        args.budgets = list(dict.fromkeys(args.budgets[:1] + args.budgets[-1:]))
    if args.quick and args.out == PRESETS[args.budget]["out"]:  # smoke runs never write into results/
        import tempfile

        args.out = tempfile.mkdtemp(prefix="spn_cnn-quick-")
    if args.work_dir is None:
        args.work_dir = str(Path(args.out) / "work") if args.quick else str(Path("runs") / "spn_cnn" / args.budget)
    for b in args.budgets:
        parse_budget(b)


def _teacher(args, seed: int, x_tr, y_tr, trained: dict):
    """The dense model of ``seed``: trained in this call, else loaded from --work-dir (trained there if missing)."""
    if seed in trained:
        return trained[seed]
    path = Path(args.work_dir) / f"teacher-dense-s{seed}-{_teacher_tag(args, len(x_tr))}.pt"
    teacher = build("dense", args, seed)
    if path.is_file():
        teacher.load_state_dict(torch.load(path, weights_only=True))
        print(f"  seed {seed}: dense teacher loaded from {path}")
    else:
        print(f"  seed {seed}: no saved dense teacher ({path}); training it (not recorded)")
        train_classifier(teacher, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=seed, desc=f"teacher s{seed}")
        _save_teacher(teacher, path)
    teacher.eval()
    trained[seed] = teacher
    return teacher


def _teacher_tag(args, n_train: int) -> str:
    return f"w{args.width}b{args.blocks}-n{n_train}-e{args.epochs}-bs{args.batch_size}-lr{args.lr:g}"


def _save_teacher(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def run(args) -> int:
    from .data.fashion_mnist import load_fashion_mnist

    resolve_args(args)
    torch.set_num_threads(args.threads)
    kinds = model_kinds(args)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_root, args.train_limit, args.test_limit)
    print(f"Fashion-MNIST {len(x_tr)} train / {len(x_te)} test, ResNetSmall width {args.width} x {args.blocks} "
          f"block(s)/stage, {args.epochs} epochs, budget {args.budget}; models "
          f"{[k + (' +KD' if kd else '') for k, kd in kinds]}; seeds {args.seeds}")
    if args.estimate is not None:
        return estimate(args, kinds, x_tr, y_tr)
    kd = lambda s, t, y: distillation_loss(s, y, t, lam=args.kd_lambda, temperature=args.kd_temperature)  # noqa: E731
    records = []
    progress = lambda: save_progress(args, records, {"config": config_of(args)}, key=("seed", "model", "kd"))  # noqa: E731
    for seed in args.seeds:
        teachers = {}
        for kind, use_kd in kinds:
            model = build(kind, args, seed)
            if kind.startswith("dense"):
                secs = train_classifier(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, seed=seed, desc=f"{kind} s{seed}")
                if kind == "dense":
                    model.eval()
                    teachers[seed] = model
                    _save_teacher(model, Path(args.work_dir) / f"teacher-dense-s{seed}-{_teacher_tag(args, len(x_tr))}.pt")
                records.append(_record(model, kind, None, False, seed, secs, x_te, y_te, args))
                print(f"  seed {seed} {kind} acc {records[-1]['test_accuracy']:.4f} ({secs:.0f}s)")
                progress()
                continue
            teacher = _teacher(args, seed, x_tr, y_tr, teachers) if use_kd else None
            set_phase(model, "full")

            def on_step(step, total, model=model):
                if step == int(args.full_frac * total):
                    set_phase(model, "ternary")

            secs = train_classifier(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size,
                                    lr=args.lr, seed=seed, desc=f"{kind}{'+kd' if use_kd else ''} s{seed}",
                                    teacher=teacher, kd_loss=kd, on_step=on_step)
            set_phase(model, "ternary")
            records.append(_record(model, kind, kind.split("@")[1], use_kd, seed, secs, x_te, y_te, args))
            print(f"  seed {seed} {kind}{' KD' if use_kd else ''} acc {records[-1]['test_accuracy']:.4f} ({secs:.0f}s)")
            progress()
    meta = {"config": config_of(args),
            "scale": f"Fashion-MNIST first {len(x_tr)} train images, {len(x_te)} test images; ResNetSmall width "
                     f"{args.width}/{2 * args.width}, {args.blocks} residual block(s) per stage (stem stride 2, 14x14 "
                     f"then 7x7), {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} one-cycle, "
                     f"full-precision phase for the first {args.full_frac:.0%} of steps then ternary; KD lambda "
                     f"{args.kd_lambda}, T {args.kd_temperature}; {args.threads} thread(s) (budget {args.budget})"}
    return finish(args, records, meta, plot, table, key=("seed", "model", "kd"))


def estimate(args, kinds, x_tr, y_tr) -> int:
    """Time ``args.estimate`` steps per model (ternary phase; KD adds a teacher forward) and extrapolate."""
    import math

    import torch.nn.functional as F

    steps_per_run = args.epochs * math.ceil(len(x_tr) / args.batch_size)
    teacher = build("dense", args, 0).eval()
    total = 0.0
    print(f"timing {args.estimate} steps of batch {args.batch_size} per model on {torch.get_num_threads()} thread(s); "
          f"a run is {steps_per_run} steps")
    for kind, use_kd in kinds:
        model = build(kind, args, 0)
        if not kind.startswith("dense"):
            set_phase(model, "ternary")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        xb, yb = x_tr[: args.batch_size], y_tr[: args.batch_size]

        def step(model=model, opt=opt, use_kd=use_kd):
            if use_kd:
                with torch.no_grad():
                    teacher(xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = estimate_step_seconds(step, args.estimate)
        total += sec * steps_per_run
        print(f"  {kind + (' +KD' if use_kd else ''):22s} {1000 * sec:6.0f} ms/step -> {fmt_minutes(sec * steps_per_run)} per run")
    print(f"estimated total for {len(kinds)} models x {len(args.seeds)} seed(s): {fmt_minutes(total * len(args.seeds))}")
    return 0


def _record(model, kind, budget, use_kd, seed, secs, x_te, y_te, args) -> dict:
    costs = arithmetic_costs(model, x_te[:1], exclude=("stem",))
    p, ratio, g = parse_budget(budget) if budget else (None, None, None)
    return {"seed": seed, "model": kind, "kd": use_kd, "out_patch": p, "rank_ratio": ratio, "groups": g,
            "budget": args.budget, "width": int(kind.split("=")[1]) if kind.startswith("dense@width=") else args.width,
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


def _family(model: str) -> tuple[int, int]:
    """(out_patch p, groups g) of an SPN kind such as ``spn@2:1:4`` (groups default 1)."""
    p, _ratio, g = parse_budget(model.split("@")[1])
    return p, g


def plot(records: list[dict], out: Path) -> Path:
    """Three panels like the StrassenNets figure: test accuracy against convolution multiplications, additions
    and model size. One colour per (out_patch p, groups g) family with its r/c_out ratios joined by a line (circles
    without distillation, squares and dashes with it), full precision as stars; mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in records:
        groups.setdefault(_label(r), []).append(r)
    spn = {k: rs for k, rs in groups.items() if not rs[0]["model"].startswith("dense")}
    families = sorted({_family(rs[0]["model"]) for rs in spn.values()})
    cmap = plt.get_cmap("tab10")
    colour = {f: cmap(i % 10) for i, f in enumerate(families)}
    seeds = sorted({len(rs) for rs in groups.values()})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    panels = [("conv_mults", "multiplications per image (convolutions)"),
              ("conv_adds", "additions per image (convolutions)"), ("model_bits", "model size (KiB)")]
    for ax, (key, title) in zip(axes, panels):
        scale = 8192 if key == "model_bits" else 1
        for fam in families:
            for kd, marker, ls in ((False, "o", "-"), (True, "s", "--")):
                pts = sorted((rs[0][key] / scale, *mean_std([r["test_accuracy"] for r in rs]), rs[0]["rank_ratio"])
                             for rs in spn.values() if _family(rs[0]["model"]) == fam and bool(rs[0]["kd"]) == kd)
                if not pts:
                    continue
                ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[q[2] for q in pts], marker=marker,
                            linestyle=ls, capsize=3, color=colour[fam], mfc="white" if kd else colour[fam],
                            label=f"p={fam[0]}, g={fam[1]}" + (" + KD" if kd else ""))
                if not kd:
                    for v, m, _, ratio in pts:
                        ax.annotate(f"{ratio:g}", (v, m), fontsize=7, textcoords="offset points", xytext=(3, -9))
        for label, rs in groups.items():
            if not label.startswith("dense"):
                continue
            m, sd = mean_std([r["test_accuracy"] for r in rs])
            v = rs[0][key] / scale
            ax.errorbar([v], [m], yerr=[sd], fmt="*" if label == "dense" else "P", markersize=12 if label == "dense" else 9,
                        color="k" if label == "dense" else "gray",
                        label="full precision (dense)" if label == "dense" else f"full precision {label[6:]}")
        log_x(ax)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle("StrassenNets CNN on Fashion-MNIST: numbers at points are r/c_out; "
                 f"{'/'.join(map(str, seeds))} seed(s) per point")
    fig.tight_layout()
    path = out / "accuracy_vs_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
