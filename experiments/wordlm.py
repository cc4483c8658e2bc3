"""``python experiments/run.py wordlm``: StrassenNets' character-aware word-level language model on Shakespeare.

The model of Kim et al. 2016 (experiments.models.wordlm.CharAwareLM: character embedding, convolutions of
widths 1..6 with max over time, a highway layer, a 2-layer LSTM, a softmax over the most frequent words plus
<unk>), full precision against StrassenNets versions whose layers (``--spn-parts``: the character convolutions,
the highway linears, the LSTM input and recurrent matmuls, the word softmax) are ternary SPN layers
(``SPNConv2d`` / ``SPNLinear``) at several hidden widths: r = ratio * c_out for the convolutions and
r = ratio * min(in, out) for the linear layers (ratio 1 is the full-rank width; the LSTM gates get ratio * H as
in the char-LSTM). The split of works is the char-LSTM's (experiments/charlm.py): training on every work but the
held-out ones (default hamlet, tempest, sonnets), perplexity on the held-out works (out-of-vocabulary targets
are <unk> and count, as on PTB; the <unk> rate is recorded). Training: truncated backpropagation through time
over ``--batch-size`` parallel streams of the training text, AdamW one-cycle, the first ``--full-frac`` of the
steps in full precision, the rest ternary (straight-through); evaluated ternary.

Reported per run: held-out perplexity, multiplications and additions per word (strassenkit.cost, every step
of the recurrent layers included), model size in bits (2 bits per ternary entry, 32 otherwise), training time.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from strassenkit.nn import SPNConv2d, SPNLinear, set_phase

from .common import (add_budget_argument, apply_budget, arithmetic_costs, config_of, estimate_step_seconds, finish,
                     fmt_minutes, fmt_ms, group_runs, log_x, mean_std, model_bits, n_params, save_progress)
from .models.wordlm import CharAwareLM, dense_conv, dense_linear

NAME = "wordlm"
PARTS = ("conv", "highway", "lstm", "head")

#: named budgets (``--budget``); "full" is issue #18's: the whole training text, 3 epochs, a 2 x 200 LSTM over a
#: 5000-word vocabulary, the full-precision model at 3 learning rates, SPN at r ratios 0.5, 1, 2
PRESETS = {
    "small": dict(vocab=2000, hidden=100, filters_per_width=15, epochs=1, train_tokens=200000, lr=2e-3,
                  dense_lrs=[], ratios=[0.5, 1.0], out="results/wordlm/small"),
    "full": dict(vocab=5000, hidden=200, filters_per_width=25, epochs=3, train_tokens=None, lr=2e-3,
                 dense_lrs=[1e-3, 4e-3], ratios=[0.5, 1.0, 2.0], out="results/wordlm"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, 1 ratio, a few steps)")
    add_budget_argument(p, PRESETS, "full")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="SPN r ratios (see the module doc)")
    p.add_argument("--spn-parts", nargs="+", choices=PARTS, default=list(PARTS), help="layers made SPN")
    p.add_argument("--vocab", type=int, default=None, help="output words: the N-1 most frequent + <unk>")
    p.add_argument("--hidden", type=int, default=None, help="LSTM width H (2 layers)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--char-dim", type=int, default=15)
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="convolution filter widths")
    p.add_argument("--filters-per-width", type=int, default=None, help="filters of width w: this x w")
    p.add_argument("--highway-layers", type=int, default=1)
    p.add_argument("--max-word-len", type=int, default=19)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--seq-len", type=int, default=35)
    p.add_argument("--batch-size", type=int, default=20, help="parallel streams of the training text")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training text (may be fractional)")
    p.add_argument("--train-tokens", type=int, default=None, help="use only the first N training tokens")
    p.add_argument("--val-tokens", type=int, default=None, help="evaluate only the first N held-out tokens")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dense-lrs", type=float, nargs="*", default=None,
                   help="extra full-precision models at these learning rates (tuning check of the reference)")
    p.add_argument("--full-frac", type=float, default=0.34, help="fraction of steps in the full-precision phase")
    p.add_argument("--only", nargs="+", default=None, help="train only these model kinds (dense, dense@lr=X, spn@R)")
    p.add_argument("--estimate", type=int, nargs="?", const=40, default=None, metavar="STEPS",
                   help="time STEPS training steps (default 40) per selected model, print the extrapolated wall "
                        "time per run and in total, train nothing")
    p.add_argument("--text-root", default=None)
    p.add_argument("--val-works", nargs="+", default=None,
                   help="held-out works (default: charlm's hamlet tempest sonnets)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default results/wordlm; --budget small: "
                                                "results/wordlm/small)")
    p.add_argument("--append", action="store_true", help="merge into an existing runs.json")


def resolve_args(args) -> None:
    apply_budget(args, PRESETS)
    if args.quick:
        args.seeds, args.ratios = args.seeds[:1], args.ratios[:1]
        args.train_tokens = min(args.train_tokens or 4000, 4000)
        args.val_tokens = min(args.val_tokens or 1500, 1500)
        args.vocab, args.hidden, args.filters_per_width = min(args.vocab, 300), min(args.hidden, 24), min(args.filters_per_width, 4)
        args.widths, args.epochs, args.seq_len, args.batch_size = args.widths[:3], min(args.epochs, 1), 10, 8
        if args.out == PRESETS[args.budget]["out"]:  # smoke runs never write into results/
            import tempfile

            args.out = tempfile.mkdtemp(prefix="wordlm-quick-")


def model_kinds(args) -> list[str]:
    kinds = ["dense"] + [f"dense@lr={lr:g}" for lr in args.dense_lrs if lr != args.lr] + [f"spn@{r:g}" for r in args.ratios]
    if args.only:
        unknown = [k for k in args.only if k not in kinds]
        if unknown:
            raise ValueError(f"--only {unknown}: not among this budget's model kinds {kinds}")
        kinds = [k for k in kinds if k in args.only]
    return kinds


def build(kind: str, corpus, args, seed: int) -> CharAwareLM:
    torch.manual_seed(seed)
    make_linear, make_conv, make_head, make_hw = dense_linear, dense_conv, dense_linear, dense_linear
    if kind.startswith("spn@"):
        ratio = float(kind.split("@")[1])
        spn_linear = lambda i, o: SPNLinear(i, o, rank=max(1, round(ratio * min(i, o))))  # noqa: E731
        parts = set(args.spn_parts)
        if "lstm" in parts:
            make_linear = spn_linear
        if "highway" in parts:
            make_hw = spn_linear
        if "head" in parts:
            make_head = spn_linear
        if "conv" in parts:
            make_conv = lambda ci, co, w: SPNConv2d(ci, co, (1, w), rank=max(1, round(ratio * co)))  # noqa: E731
    elif not kind.startswith("dense"):
        raise ValueError(f"unknown model kind {kind!r}")
    model = CharAwareLM(corpus.chars, len(corpus.char_vocab) + 4, len(corpus.vocab), char_dim=args.char_dim,
                        widths=tuple(args.widths), filters_per_width=args.filters_per_width,
                        highway_layers=args.highway_layers, hidden=args.hidden, layers=args.layers,
                        dropout=args.dropout, make_linear=make_linear, make_conv=make_conv, make_head=make_head,
                        make_highway=make_hw)
    return model


def streams(data: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, N // batch) contiguous streams of ``data`` (the tail that does not fit is dropped)."""
    per = len(data) // batch
    if per < 2:
        raise ValueError(f"{len(data)} tokens are too few for {batch} streams")
    return data[: per * batch].reshape(batch, per)


def steps_per_epoch(n_tokens: int, args) -> int:
    return max(1, (n_tokens // args.batch_size - 1) // args.seq_len)


def train(model, corpus, args, seed: int, desc: str, spn: bool, lr: float) -> float:
    from tqdm.auto import tqdm

    data = streams(corpus.train, args.batch_size)
    per_epoch = steps_per_epoch(len(corpus.train), args)
    total = max(1, round(args.epochs * per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    if spn:
        set_phase(model, "full")
    torch.manual_seed(seed)  # dropout masks
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, leave=False, mininterval=5)
    state = None
    for step in range(total):
        if spn and step == int(args.full_frac * total):
            set_phase(model, "ternary")
        s = (step % per_epoch) * args.seq_len
        if s == 0:
            state = None  # a new pass over the text
        x = data[:, s: s + args.seq_len]
        y = corpus.word_of_type[data[:, s + 1: s + 1 + args.seq_len]]
        logits, state = model(x, state)
        state = [(h.detach(), c.detach()) for h, c in state]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update()
        if step % 50 == 0:
            bar.set_postfix(ppl=f"{math.exp(min(loss.item(), 30)):.0f}")
    bar.close()
    if spn:
        set_phase(model, "ternary")
    return time.perf_counter() - t0


@torch.no_grad()
def perplexity(model, corpus, seq_len: int = 35, batch: int = 10) -> float:
    """exp(mean -log p(next word)) over the held-out tokens, ``batch`` streams with the LSTM state carried."""
    model.eval()
    data = streams(corpus.val, batch)
    total, count, state = 0.0, 0, None
    for s in range(0, data.shape[1] - 1, seq_len):
        x = data[:, s: min(s + seq_len, data.shape[1] - 1)]
        y = corpus.word_of_type[data[:, s + 1: s + 1 + x.shape[1]]]
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def costs_per_word(model, corpus, T: int = 35) -> dict:
    """Mults/adds per word from strassenkit.cost on one sequence of ``T`` words (recurrent steps as modules)."""
    model.count_mode = True
    try:
        c = arithmetic_costs(model.eval(), corpus.val[None, :T])
    finally:
        model.count_mode = False
    return {"mults_per_word": c["mults"] / T, "adds_per_word": c["adds"] / T, "cost_counter": c["counter"]}


def load_corpus(args):
    from .data.shakespeare import DEFAULT_VAL_WORKS, load_word_corpus

    return load_word_corpus(args.text_root, val_works=args.val_works or DEFAULT_VAL_WORKS, vocab_size=args.vocab,
                            max_word_len=args.max_word_len, train_tokens=args.train_tokens, val_tokens=args.val_tokens)


def run(args) -> int:
    resolve_args(args)
    torch.set_num_threads(args.threads)
    kinds = model_kinds(args)
    corpus = load_corpus(args)
    per_epoch = steps_per_epoch(len(corpus.train), args)
    print(f"Shakespeare words: {len(corpus.train):,} training tokens ({len(corpus.train_works)} works), "
          f"{len(corpus.val):,} held-out tokens of {corpus.val_works} (<unk> rate {corpus.unk_rate_val:.1%}); vocab "
          f"{len(corpus.vocab)}; LSTM {args.layers} x {args.hidden}; {args.epochs} epochs of {per_epoch} steps; "
          f"budget {args.budget}; {kinds}; seeds {args.seeds}")
    if args.estimate is not None:
        return estimate(args, kinds, corpus, per_epoch)
    records = []
    for seed in args.seeds:
        for kind in kinds:
            model = build(kind, corpus, args, seed)
            lr = float(kind.split("=")[1]) if kind.startswith("dense@lr=") else args.lr
            spn = kind.startswith("spn")
            secs = train(model, corpus, args, seed, f"{kind} s{seed}", spn=spn, lr=lr)
            ppl = perplexity(model, corpus, args.seq_len)
            rec = {"seed": seed, "model": kind, "budget": args.budget, "lr": lr,
                   "ratio": float(kind.split("@")[1]) if spn else None, "spn_parts": list(args.spn_parts) if spn else [],
                   "val_perplexity": ppl, "params": n_params(model), "model_bits": model_bits(model),
                   "train_seconds": secs, **costs_per_word(model, corpus)}
            records.append(rec)
            save_progress(args, records, {"config": config_of(args)})  # every finished run is on disk
            print(f"  seed {seed} {kind}: held-out perplexity {ppl:.1f} ({secs:.0f}s)")
    meta = {"config": config_of(args), "unk_rate_val": corpus.unk_rate_val,
            "scale": f"char-aware LM (char dim {args.char_dim}, widths {args.widths} x {args.filters_per_width} w "
                     f"filters, {args.highway_layers} highway, LSTM {args.layers} x {args.hidden}, dropout "
                     f"{args.dropout}), vocabulary {len(corpus.vocab)} words incl. <unk>; {len(corpus.train):,} "
                     f"training tokens, {args.epochs} epochs of {per_epoch} steps x {args.batch_size} streams x "
                     f"{args.seq_len} words; held-out: {len(corpus.val):,} tokens of {corpus.val_works} (<unk> "
                     f"{corpus.unk_rate_val:.1%}); AdamW lr {args.lr} one-cycle; SPN parts {args.spn_parts}, full "
                     f"precision for the first {args.full_frac:.0%} of steps then ternary; {args.threads} thread(s) "
                     f"(budget {args.budget})"}
    return finish(args, records, meta, plot, table)


def estimate(args, kinds, corpus, per_epoch) -> int:
    total_steps = max(1, round(args.epochs * per_epoch))
    data = streams(corpus.train, args.batch_size)
    total = 0.0
    print(f"timing {args.estimate} steps per model on {torch.get_num_threads()} thread(s); a run is {total_steps} steps")
    for kind in kinds:
        model = build(kind, corpus, args, 0)
        if kind.startswith("spn"):
            set_phase(model, "ternary")
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = data[:, : args.seq_len], corpus.word_of_type[data[:, 1: args.seq_len + 1]]

        def step(model=model, opt=opt):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = estimate_step_seconds(step, args.estimate, warmup=2)
        total += sec * total_steps
        print(f"  {kind:14s} {1000 * sec:6.0f} ms/step -> {fmt_minutes(sec * total_steps)} per run (+ evaluation)")
    print(f"estimated total for {len(kinds)} models x {len(args.seeds)} seed(s): {fmt_minutes(total * len(args.seeds))}")
    return 0


def table(records: list[dict]) -> str:
    groups = group_runs(records, dense_first=True)
    d = groups.get("dense", [None])[0]
    lines = ["| model | seeds | held-out perplexity | mults/word | mult reduction | adds/word | model size (KiB) "
             "| size reduction |", "|---|---|---|---|---|---|---|---|"]
    for kind, rs in groups.items():
        r0 = rs[0]
        red = f"{d['mults_per_word'] / r0['mults_per_word']:.1f}x" if d else "?"
        size = f"{d['model_bits'] / r0['model_bits']:.1f}x" if d else "?"
        lines.append(f"| {kind} | {len(rs)} | {fmt_ms([r['val_perplexity'] for r in rs], 1)} | {r0['mults_per_word']:,.0f} "
                     f"| {red} | {r0['adds_per_word']:,.0f} | {r0['model_bits'] / 8192:,.1f} | {size} |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(records)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    panels = [("mults_per_word", "multiplications per word"), ("adds_per_word", "additions per word"),
              ("model_bits", "model size (KiB)")]
    for ax, (key, title) in zip(axes, panels):
        pts = []
        for kind, rs in groups.items():
            m, s = mean_std([r["val_perplexity"] for r in rs])
            v = rs[0][key] / (8192 if key == "model_bits" else 1)
            if kind.startswith("dense"):
                ax.errorbar([v], [m], yerr=[s], fmt="*" if kind == "dense" else "P", markersize=12 if kind == "dense" else 8,
                            color="k" if kind == "dense" else "gray", label=f"full precision {kind[6:] or ''}".strip())
            else:
                pts.append((v, m, s, kind[4:]))
        pts.sort()
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        linestyle="none", label="SPN ternary")
            for v, m, _, lab in pts:
                ax.annotate(f"r={lab}", (v, m), fontsize=7, textcoords="offset points", xytext=(3, 3))
        log_x(ax)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=8)
    fig.suptitle("StrassenNets character-aware word LM on Shakespeare (held-out works)")
    fig.tight_layout()
    path = out / "perplexity_vs_cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
