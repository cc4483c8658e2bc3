"""``python experiments/run.py approx``: how well can r products approximate the 4x4 tile product, per init family?

For tile t (default 4), every rank r and family (als, truncate, polynomial, polynomial_ls, random) and several seeds:

1. ``tensor_rel_sq``: the data-independent error, the relative squared residual ||T - T_r||^2 / ||T||^2
   of the algorithm against the <t,t,t> matmul tensor; ``gauss_mc_rel_sq`` is the same quantity measured
   by Monte Carlo on i.i.d. standard Gaussian tile pairs (E||AB - alg(A,B)||^2 / E||AB||^2) with its
   standard error, to show numerically that the two agree.
2. ``gauss_refined_rel_sq``: after refining (E_x, E_w, D) with Adam on fresh Gaussian tile pairs
   (``steps`` steps), the relative squared error on a fixed held-out set of Gaussian tile pairs.
3. ``real_init_rel_sq`` / ``real_refined_rel_sq``: the same on real data: the inputs and weights of every
   linear layer of a small ViT trained on sklearn's digits (dense, trained here for ``vit_epochs``
   epochs with one thread). The error is the relative squared error of each layer's full output
   X @ W.T computed by STL with the algorithm (tiles along the sequence inside each sample), averaged
   over layers. Refinement uses activations of training images; the reported error uses test images.

Every configuration gets the same refinement budget (steps, batch, learning-rate schedule).
Writes ``summary.json`` (one record per family, r, seed, plus the setup) and ``approx.png`` to ``--out``
and prints the headline: the median refined error at r=24 of the best theory-backed family vs random.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RANKS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 49, 64)
FAMILIES = ("als", "truncate", "polynomial", "polynomial_ls", "random")
THEORY = ("als", "truncate", "polynomial", "polynomial_ls")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="results/approx", help="output directory (summary.json, approx.png)")
    parser.add_argument("--tile", type=int, default=4, help="tile size t (format <t,t,t>)")
    parser.add_argument("--ranks", type=str, default=",".join(map(str, RANKS)), help="comma-separated ranks")
    parser.add_argument("--families", type=str, default=",".join(FAMILIES), help="comma-separated families")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 per (family, rank)")
    parser.add_argument("--steps", type=int, default=100, help="Adam refinement steps (same for every config)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument("--vit-epochs", type=int, default=10, help="epochs of dense ViT training on digits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    parser.add_argument("--quick", action="store_true", help="tiny run: ranks 8,24; 2 seeds; 20 steps; 2 ViT epochs")
    parser.add_argument("--replot", action="store_true", help="only redraw approx.png and README.md from summary.json")
    parser.add_argument("--search", type=str, default=None, metavar="FMT:TRIES,...",
                        help="instead of the study, measure the exact-search success rate, e.g. "
                             "'2x2x2r7:20,3x3x3r23:30' (one attempt per seed), written to search.json")


# --------------------------------------------------------------------------- data
def train_vit(epochs: int, seed: int = 0):
    """Train the reference ViT on digits; returns (model, test accuracy, (x_train, x_test))."""
    from strassenkit._models.digits import load_digits_split
    from strassenkit._models.vit import ViT

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed=seed)
    model = ViT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
    return model, acc, (xtr, xte)


@torch.no_grad()
def linear_io(model, images: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, input (B, L, K) float64, weight (K, N) float64) for every nn.Linear of ``model``."""
    records, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, inp, out, name=name: records.__setitem__(name, inp[0])))
    model(images)
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())
    return [(n, records[n].double(), mods[n].weight.detach().T.double().contiguous()) for n in records]


# --------------------------------------------------------------------------- errors
def gauss_error(U: torch.Tensor, V: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, t: int):
    """Relative squared error on tile pairs A, B (S, t, t): sum ||AB - alg(A,B)||^2 / sum ||AB||^2."""
    S = A.shape[0]
    C = A @ B
    xa = A.reshape(S, -1) @ U  # (S, r)
    xb = B.reshape(S, -1) @ V
    Ch = (xa * xb) @ W.T
    return ((C.reshape(S, -1) - Ch) ** 2).sum() / (C**2).sum()


def real_error(U, V, W, layers, t: int) -> torch.Tensor:
    """Mean over layers of ||X W - STL(X, W)||^2 / ||X W||^2 (tiles t x t along the sequence of each sample)."""
    from strassenkit.functional import stl_apply, stl_encode_weight

    errs = []
    for _, x, w in layers:
        y = x @ w
        w_hat = stl_encode_weight(w, V.T, t)
        yh = stl_apply(x, w_hat, U.T, W, t, out_features=w.shape[1])
        errs.append(((y - yh) ** 2).sum() / (y**2).sum())
    return torch.stack(errs).mean()


def refine(alg, loss_fn, steps: int, lr: float, dtype=torch.float64):
    """Adam on (U, V, W) (equivalently E_x, E_w, D) with cosine decay; returns the refined tensors as float64."""
    U, V, W = (x.clone().requires_grad_(True) for x in alg.factors(dtype))
    opt = torch.optim.Adam([U, V, W], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    for s in range(steps):
        loss = loss_fn(U, V, W, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return U.detach().double(), V.detach().double(), W.detach().double()


# --------------------------------------------------------------------------- study
def run_study(
    tile=4, ranks=RANKS, families=FAMILIES, seeds=5, steps=100, lr=1e-2, vit_epochs=10,
    gauss_eval=8192, gauss_batch=256, mc_samples=20000, n_train_images=8, n_test_images=96, progress=True,
) -> dict:
    from tqdm.auto import tqdm

    from strassenkit.algorithms import approximate

    t = tile
    t0 = time.perf_counter()
    model, acc, (xtr, xte) = train_vit(vit_epochs)
    g = torch.Generator().manual_seed(1234)
    train_layers = linear_io(model, xtr[torch.randperm(len(xtr), generator=g)[:n_train_images]])
    test_layers = linear_io(model, xte[:n_test_images])
    train_layers32 = [(n, x.float(), w.float()) for n, x, w in train_layers]  # refinement runs in float32
    vit_seconds = time.perf_counter() - t0
    gev = torch.Generator().manual_seed(99)
    Aev = torch.randn(gauss_eval, t, t, generator=gev, dtype=torch.float64)
    Bev = torch.randn(gauss_eval, t, t, generator=gev, dtype=torch.float64)
    configs = [(f, r, s) for f in families for r in ranks for s in range(seeds)]
    records = []
    it = tqdm(configs, desc="approx study", disable=None if progress else True)
    for fam, r, seed in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(f"{fam} r={r} seed={seed}")
        tc = time.perf_counter()
        try:
            alg = approximate(fam, tile=t, rank=r, seed=seed)
        except ValueError as e:  # e.g. a family that cannot produce this rank
            records.append({"family": fam, "rank": r, "seed": seed, "error": str(e)})
            continue
        init_s = time.perf_counter() - tc
        U0, V0, W0 = alg.factors(torch.float64)
        tensor = float(alg.residual() ** 2)
        gmc = torch.Generator().manual_seed(10_000 + seed)
        A = torch.randn(mc_samples, t, t, generator=gmc, dtype=torch.float64)
        B = torch.randn(mc_samples, t, t, generator=gmc, dtype=torch.float64)
        C = (A @ B).reshape(mc_samples, -1)
        Ch = ((A.reshape(mc_samples, -1) @ U0) * (B.reshape(mc_samples, -1) @ V0)) @ W0.T
        num = ((C - Ch) ** 2).sum(1)
        den = (C**2).sum(1)
        mc = float(num.sum() / den.sum())
        # delta-method standard error of a ratio of means
        md = den.mean()
        se = float(torch.sqrt(((num - mc * den) ** 2).mean() / mc_samples) / md)

        gtr = torch.Generator().manual_seed(20_000 + seed)

        def gauss_loss(U, V, W, s):
            A = torch.randn(gauss_batch, t, t, generator=gtr, dtype=torch.float64)
            B = torch.randn(gauss_batch, t, t, generator=gtr, dtype=torch.float64)
            return gauss_error(U, V, W, A, B, t)

        Ug, Vg, Wg = refine(alg, gauss_loss, steps, lr)
        with torch.no_grad():
            g_init = float(gauss_error(U0, V0, W0, Aev, Bev, t))
            g_ref = float(gauss_error(Ug, Vg, Wg, Aev, Bev, t))

        def real_loss(U, V, W, s):
            return real_error(U, V, W, train_layers32, t)

        Ur, Vr, Wr = refine(alg, real_loss, steps, lr, dtype=torch.float32)
        with torch.no_grad():
            r_init = float(real_error(U0, V0, W0, test_layers, t))
            r_ref = float(real_error(Ur, Vr, Wr, test_layers, t))
        records.append({
            "family": fam, "rank": r, "seed": seed, "flop_factor": t**3 / r,
            "tensor_rel_sq": tensor, "gauss_mc_rel_sq": mc, "gauss_mc_stderr": se,
            "gauss_init_rel_sq": g_init, "gauss_refined_rel_sq": g_ref,
            "real_init_rel_sq": r_init, "real_refined_rel_sq": r_ref,
            "init_seconds": init_s, "seconds": time.perf_counter() - tc,
            "source": alg.source,
        })
    setup = {
        "tile": t, "ranks": list(ranks), "families": list(families), "seeds": seeds, "steps": steps, "lr": lr,
        "gauss_batch": gauss_batch, "gauss_eval_pairs": gauss_eval, "mc_samples": mc_samples,
        "vit": {"epochs": vit_epochs, "test_accuracy": acc, "train_seconds": vit_seconds,
                "layers": [(n, list(x.shape), list(w.shape)) for n, x, w in train_layers],
                "refine_images": n_train_images, "eval_images": n_test_images},
        "error_definition": "relative squared error sum||Y - Y_hat||^2 / sum||Y||^2 (real: mean over layers)",
        "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
    }
    return {"setup": setup, "records": records, "headline": headline(records)}


def _median(records, fam, r, key):
    vals = [x[key] for x in records if x["family"] == fam and x["rank"] == r and key in x]
    return float(np.median(vals)) if vals else None


def headline(records, rank: int = 24) -> dict:
    """Median refined errors at ``rank``: best theory-backed family vs random (Gaussian and real tiles)."""
    out = {"rank": rank}
    for key in ("real_refined_rel_sq", "gauss_refined_rel_sq", "tensor_rel_sq"):
        theo = {f: _median(records, f, rank, key) for f in THEORY}
        theo = {f: v for f, v in theo.items() if v is not None}
        best = min(theo, key=theo.get) if theo else None
        out[key] = {"best_theory_family": best, "best_theory_median": theo.get(best) if best else None,
                    "random_median": _median(records, "random", rank, key), "all": theo}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in summary["records"] if "tensor_rel_sq" in r]
    fams = summary["setup"]["families"]
    keys = [("tensor_rel_sq", "data-independent (tensor residual)"),
            ("gauss_refined_rel_sq", "after Adam on Gaussian tiles"),
            ("real_init_rel_sq", "real ViT layers, at init"),
            ("real_refined_rel_sq", "real ViT layers, after Adam")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), sharey=True)
    floor = 1e-4
    for ax, (key, title) in zip(axes, keys):
        for fam in fams:
            ranks = sorted({r["rank"] for r in recs if r["family"] == fam})
            if not ranks:
                continue
            vals = [[max(x[key], floor) for x in recs if x["family"] == fam and x["rank"] == r] for r in ranks]
            med = [np.median(v) for v in vals]
            line, = ax.plot(ranks, med, marker="o", ms=3, label=fam)
            ax.fill_between(ranks, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rank r (t=4: r=24 is 2.67x fewer core FLOPs)")
        ax.axvline(24, color="gray", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative squared error")
    fig.suptitle(f"STL t=4: median over seeds, band = min..max; exact (0) drawn at {floor:g}", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.search:
        return run_search(args.search, out)
    if args.replot:
        summary = json.loads((out / "summary.json").read_text())
        plot(summary, out / "approx.png")
        write_markdown(summary, out / "README.md")
        print_report(summary)
        return 0
    if args.quick:
        ranks, seeds, steps, epochs = (8, 24), 2, 20, 2
    else:
        ranks = tuple(int(x) for x in args.ranks.split(","))
        seeds, steps, epochs = args.seeds, args.steps, args.vit_epochs
    families = tuple(x.strip() for x in args.families.split(",") if x.strip())
    from strassenkit.algorithms import families as known_families

    unknown = [f for f in families if f not in known_families()]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; choose from {known_families()}")
    if any(r < 1 for r in ranks) or seeds < 1 or steps < 0:
        raise SystemExit("--ranks must be >= 1, --seeds >= 1, --steps >= 0")
    summary = run_study(tile=args.tile, ranks=ranks, families=families, seeds=seeds, steps=steps, lr=args.lr,
                        vit_epochs=epochs)
    summary["setup"]["command"] = "python experiments/run.py approx" + (" --quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "approx.png")
    write_markdown(summary, out / "README.md")
    print_report(summary)
    print(f"wrote {out / 'summary.json'}, {out / 'approx.png'} and {out / 'README.md'}")
    return 0


def run_search(spec: str, out: Path) -> int:
    """Success rate of :func:`strassenkit.algorithms.search_stats` (one search attempt per seed 0..tries-1) per format."""
    import re

    from strassenkit.algorithms import search_stats

    results = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)r(\d+):(\d+)\s*", item)
        if not m:
            raise SystemExit(f"--search: cannot parse {item!r}; write e.g. '2x2x2r7:20'")
        n, mm, p, r, tries = (int(g) for g in m.groups())
        st = search_stats(n, mm, p, r, range(tries))
        rec = {"format": [n, mm, p], "rank": r, **st}
        results.append(rec)
        print(f"<{n},{mm},{p};{r}>: {st['successes']}/{st['tries']} random starts gave a verified exact algorithm "
              f"({100 * st['rate']:.0f} %), {st['seconds_per_try']:.1f} s per start")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "search.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    for rec in results:
        old["<{},{},{};{}>".format(*rec["format"], rec["rank"])] = rec
    path.write_text(json.dumps(old, indent=1))
    print(f"wrote {path}")
    return 0


def write_markdown(summary: dict, path: Path) -> None:
    """A short Markdown table of the medians (regenerated with the JSON)."""
    recs = [r for r in summary["records"] if "tensor_rel_sq" in r]
    s = summary["setup"]
    lines = [
        "# Tile-approximation study (t = {})".format(s["tile"]), "",
        f"Regenerate: `{s.get('command', 'python experiments/run.py approx')}` (figures: `approx.png`; raw records: `summary.json`).",
        "", f"Relative squared error, median over {s['seeds']} seeds (min..max in brackets). Refinement: "
        f"{s['steps']} Adam steps, lr {s['lr']} cosine, identical for every family. Real tiles: inputs and weights "
        f"of the {len(s['vit']['layers'])} linear layers of a ViT trained on sklearn digits "
        f"(test accuracy {s['vit']['test_accuracy']:.3f}); refined on {s['vit']['refine_images']} training images, "
        f"measured on {s['vit']['eval_images']} test images.", "",
        "| family | r | core FLOP cut | tensor residual | MC Gaussian | Gaussian refined | real init | real refined |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(fam, r, k):
        v = [x[k] for x in recs if x["family"] == fam and x["rank"] == r]
        if not v:
            return "-"
        return f"{np.median(v):.4f} [{min(v):.3f}..{max(v):.3f}]" if len(v) > 1 else f"{v[0]:.4f}"

    for fam in s["families"]:
        for r in s["ranks"]:
            lines.append(f"| {fam} | {r} | {s['tile'] ** 3 / r:.2f}x | {cell(fam, r, 'tensor_rel_sq')} | "
                         f"{cell(fam, r, 'gauss_mc_rel_sq')} | {cell(fam, r, 'gauss_refined_rel_sq')} | "
                         f"{cell(fam, r, 'real_init_rel_sq')} | {cell(fam, r, 'real_refined_rel_sq')} |")
    h = summary["headline"]
    lines += ["", "## Headline", ""]
    for key, label in (("real_refined_rel_sq", "real ViT tiles"), ("gauss_refined_rel_sq", "Gaussian tiles"),
                       ("tensor_rel_sq", "data-independent, no refinement")):
        d = h[key]
        if d["best_theory_family"] and d["random_median"] is not None:
            lines.append(f"- r = {h['rank']}, {label}: best theory-backed init `{d['best_theory_family']}` "
                         f"{d['best_theory_median']:.4f} vs random {d['random_median']:.4f}")
    sj = Path(path).with_name("search.json")
    if sj.exists():
        lines += ["", "## Exact-algorithm search (`strassenkit.algorithms.search`)", "",
                  "One random start per seed; success = rounded factors proven by `verify()`. Regenerate: "
                  "`python experiments/run.py approx --search 2x2x2r7:30,3x3x3r23:30,2x3x3r15:30`.", "",
                  "| format | successes / starts | seconds per start |", "|---|---|---|"]
        for key, rec in json.loads(sj.read_text()).items():
            lines.append(f"| {key} | {rec['successes']} / {rec['tries']} | {rec['seconds_per_try']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def print_report(summary: dict) -> None:
    recs = [r for r in summary["records"] if "tensor_rel_sq" in r]
    s = summary["setup"]
    print(f"ViT on digits: test accuracy {s['vit']['test_accuracy']:.3f} ({s['vit']['epochs']} epochs); "
          f"refinement: {s['steps']} Adam steps, lr {s['lr']}; total {s['seconds']:.0f}s")
    print(f"{'family':<11} {'r':>3} {'tensor':>8} {'MC gauss':>9} {'gauss ref':>10} {'real init':>10} {'real ref':>9}  (medians over seeds)")
    for fam in s["families"]:
        for r in s["ranks"]:
            def med(k):
                v = _median(recs, fam, r, k)
                return float("nan") if v is None else v
            print(f"{fam:<11} {r:>3} {med('tensor_rel_sq'):>8.4f} {med('gauss_mc_rel_sq'):>9.4f} "
                  f"{med('gauss_refined_rel_sq'):>10.4f} {med('real_init_rel_sq'):>10.4f} {med('real_refined_rel_sq'):>9.4f}")
    h = summary["headline"]
    for key, label in (("real_refined_rel_sq", "real ViT tiles"), ("gauss_refined_rel_sq", "Gaussian tiles")):
        d = h[key]
        if d["best_theory_family"] is None or d["random_median"] is None:
            continue
        print(f"HEADLINE r={h['rank']} ({label}, after the same {s['steps']}-step refinement): best theory-backed "
              f"init '{d['best_theory_family']}' median rel. sq. error {d['best_theory_median']:.4f} vs random "
              f"{d['random_median']:.4f}")
