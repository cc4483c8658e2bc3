"""``python experiments/run.py charlm``: StrassenNets' character-level language model, scaled to Shakespeare.

A character LSTM (experiments.models.charlm.CharLSTM) whose three matmuls (input-to-gates, the recurrent
hidden-to-gates and the output projection) are SPNLinear layers with ternary W_b and W_c (full-precision
a_hat), over a sweep of hidden widths r = ratio * H; the full-precision dense LSTM is the reference.
Training text: every work except the held-out ones (default hamlet, tempest, sonnets), which give the
validation bits per character. Training: the first ``--full-frac`` of the steps in full precision, the rest
ternary (straight-through); evaluated ternary.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from strassenkit.nn import SPNLinear, set_phase

from .common import arithmetic_costs, config_of, finish, fmt_ms, group_runs, log_x, mean_std, model_bits, n_params
from .models.charlm import CharLSTM

NAME = "charlm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 1 budget, few steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="SPN r = ratio * hidden")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--full-frac", type=float, default=0.34)
    p.add_argument("--dense-lrs", type=float, nargs="*", default=[],
                   help="extra full-precision models trained at these learning rates (tuning check for the reference)")
    p.add_argument("--only", nargs="+", default=None, help="train only these model kinds (e.g. dense@lr=0.01)")
    p.add_argument("--val-chars", type=int, default=60000, help="held-out characters evaluated")
    p.add_argument("--text-root", default=None)
    p.add_argument("--val-works", nargs="+", default=None,
                   help="held-out works for validation (default: hamlet tempest sonnets)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/charlm")
    p.add_argument("--append", action="store_true", help="merge into an existing runs.json")


def build(kind: str, vocab: int, args, seed: int):
    torch.manual_seed(seed)
    if kind == "dense" or kind.startswith("dense@"):
        return CharLSTM(vocab, args.embed, args.hidden)
    ratio = float(kind.split("@")[1])
    rank = max(1, round(ratio * args.hidden))
    return CharLSTM(vocab, args.embed, args.hidden, make_linear=lambda i, o: SPNLinear(i, o, rank=rank))


def batches(data: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hi = len(data) - seq_len - 1
    for _ in range(steps):
        starts = torch.randint(0, hi, (batch_size,), generator=g)
        chunk = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def bits_per_char(model, data: torch.Tensor, seq_len: int = 256, batch: int = 16) -> float:
    """Mean -log2 p(next char) over ``data``, in chunks of ``seq_len`` with the LSTM state carried across chunks."""
    model.eval()
    n = (len(data) - 1) // batch * batch
    streams = data[: n + 1]
    per = n // batch
    x_all = torch.stack([streams[i * per: (i + 1) * per] for i in range(batch)])
    y_all = torch.stack([streams[i * per + 1: (i + 1) * per + 1] for i in range(batch)])
    total, count, state = 0.0, 0, None
    for s in range(0, per, seq_len):
        logits, state = model(x_all[:, s: s + seq_len], state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_all[:, s: s + seq_len].reshape(-1),
                                 reduction="sum").item()
        count += y_all[:, s: s + seq_len].numel()
    return total / count / math.log(2)


def train(model, corpus, args, seed: int, desc: str, spn: bool, lr: float | None = None) -> float:
    from tqdm.auto import tqdm

    lr = args.lr if lr is None else lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=args.steps, pct_start=0.1)
    if spn:
        set_phase(model, "full")
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=args.steps, desc=desc, leave=False, mininterval=5)
    for step, (x, y) in enumerate(batches(corpus.train, args.seq_len, args.batch_size, args.steps, seed)):
        if spn and step == int(args.full_frac * args.steps):
            set_phase(model, "ternary")
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update()
    bar.close()
    if spn:
        set_phase(model, "ternary")
    return time.perf_counter() - t0


def run(args) -> int:
    from .data.shakespeare import DEFAULT_VAL_WORKS, load_char_corpus

    if args.quick:
        args.seeds, args.ratios = args.seeds[:1], args.ratios[:1]
        args.steps, args.val_chars = min(args.steps, 20), min(args.val_chars, 4000)
        args.hidden, args.seq_len = min(args.hidden, 32), min(args.seq_len, 24)
    torch.set_num_threads(args.threads)
    corpus = load_char_corpus(args.text_root, val_works=args.val_works or DEFAULT_VAL_WORKS, val_chars=args.val_chars)
    V = len(corpus.vocab)
    kinds = ["dense"] + [f"dense@lr={lr:g}" for lr in args.dense_lrs] + [f"spn@{r:g}" for r in args.ratios]
    if args.only:
        kinds = [k for k in kinds if k in args.only]
    print(f"Shakespeare: {len(corpus.train):,} training chars ({len(corpus.train_works)} works), {len(corpus.val):,} "
          f"held-out chars of {corpus.val_works}; vocab {V}; LSTM H={args.hidden}; {kinds}; seeds {args.seeds}")
    records = []
    for seed in args.seeds:
        for kind in kinds:
            model = build(kind, V, args, seed)
            lr = float(kind.split("=")[1]) if kind.startswith("dense@lr=") else args.lr
            secs = train(model, corpus, args, seed, f"{kind} s{seed}", spn=kind.startswith("spn"), lr=lr)
            bpc = bits_per_char(model, corpus.val)
            costs = arithmetic_costs(model, corpus.val[None, :64])  # embedding, gates_in and head hooks
            # the recurrent layer is applied through precomputed matrices (no module hook): count 64 steps of it
            rec = arithmetic_costs(model.gates_rec, torch.zeros(64, args.hidden))
            costs = {k: costs[k] + rec[k] for k in ("mults", "adds")} | {"counter": costs["counter"]}
            rec = {"seed": seed, "model": kind, "lr": lr,
                   "ratio": float(kind.split("@")[1]) if kind.startswith("spn") else None,
                   "val_bits_per_char": bpc, "params": n_params(model), "model_bits": model_bits(model),
                   "mults_per_char": costs["mults"] / 64, "adds_per_char": costs["adds"] / 64,
                   "cost_counter": costs["counter"], "train_seconds": secs}
            records.append(rec)
            print(f"  seed {seed} {kind}: val {bpc:.3f} bits/char ({secs:.0f}s)")
    meta = {"config": config_of(args),
            "scale": f"LSTM embed {args.embed}, hidden {args.hidden}; {args.steps} steps x {args.batch_size} sequences "
                     f"x {args.seq_len} chars ({args.steps * args.batch_size * args.seq_len:,} training characters seen of "
                     f"{len(corpus.train):,}); validation: first {len(corpus.val):,} characters of the held-out works "
                     f"{corpus.val_works}; AdamW lr {args.lr} one-cycle; full precision for the first {args.full_frac:.0%} "
                     f"of steps then ternary; {args.threads} thread(s)"}
    return finish(args, records, meta, plot, table)


def table(records: list[dict]) -> str:
    groups = group_runs(records, dense_first=True)
    dm = groups["dense"][0]["mults_per_char"] if "dense" in groups else float("nan")
    lines = ["| model | seeds | val bits/char | mults/char | mult reduction | adds/char | model size (KiB) |",
             "|---|---|---|---|---|---|---|"]
    for kind, rs in groups.items():
        r0 = rs[0]
        lines.append(f"| {kind} | {len(rs)} | {fmt_ms([r['val_bits_per_char'] for r in rs], 3)} | {r0['mults_per_char']:,.0f} "
                     f"| {dm / r0['mults_per_char']:.1f}x | {r0['adds_per_char']:,.0f} | {r0['model_bits'] / 8192:.1f} |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = []
    for kind, rs in group_runs(records).items():
        m, s = mean_std([r["val_bits_per_char"] for r in rs])
        if kind.startswith("dense"):
            ax.axhline(m, color="k" if kind == "dense" else "gray", ls="--" if kind == "dense" else ":",
                       label=f"full precision {kind[6:] or ('lr=' + format(rs[0]['lr'], 'g') if rs[0].get('lr') else '--lr')} "
                             f"({m:.3f} ± {s:.3f})")
            continue
        pts.append((rs[0]["mults_per_char"], m, s, kind))
    pts.sort()
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=4,
                    label="SPN ternary")
        for x, m, _, k in pts:
            ax.annotate(k, (x, m), fontsize=7, textcoords="offset points", xytext=(3, 3))
    log_x(ax)
    ax.set_xlabel("multiplications per character")
    ax.set_ylabel("validation bits per character (held-out works)")
    ax.set_title("StrassenNets char-LSTM on Shakespeare")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "bpc_vs_mults.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
