"""``python experiments/run.py minilm``: convert a real pretrained transformer (all-MiniLM-L6-v2) to STL.

The STL paper fine-tunes TinyLlama with STL layers and compares with 2:4 structured sparsity; scaled here to
the 6-layer sentence encoder all-MiniLM-L6-v2 (d=384, FFN 1536) on Shakespeare sentences:
- ``stl-r<R>``: every linear layer of the 6 blocks (36 layers) becomes STLinear t=4, row_tile 4, rank R,
  initialized from the ``--init`` family, encoded from the dense weight, then ``calibrate_`` (least-squares
  fit of w_hat to real activations, sequentially layer by layer), then distilled from the original;
- ``2:4``: the same layers pruned by magnitude to 2 of every 4 consecutive input weights (mask fixed),
  then the same distillation.
Distillation: loss = 1 - cos(student, teacher sentence embedding) + MSE of the (L2-normalized) token states,
AdamW, ``--steps`` steps on sentences of the training works. Metrics on sentences of held-out works: mean
cosine between student and teacher embeddings, and Spearman rank correlation between student and teacher
cosine similarities of all sentence pairs. Before-distillation values are recorded too.

Tiles mix 4 consecutive tokens of a sentence (allowed: the encoder is bidirectional); padding rows are zeroed
before every linear layer (experiments.models.bert), and calibration batches group sentences of equal token
length so no padding row enters the fit.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from strassenkit import cost
from strassenkit.algorithms import resolve
from strassenkit.nn import STLinear
from strassenkit.surgery import calibrate_

from .common import available_inits, config_of, fmt_ms, group_runs, mean_std, merge_runs, read_runs, write_runs

NAME = "minilm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke run (1 seed, rank 24 + 2:4, few steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 24])
    p.add_argument("--init", default="auto", help="STL init family (auto: als if registered, else random)")
    p.add_argument("--no-24", dest="with_24", action="store_false", help="skip the 2:4 pruning baseline")
    p.add_argument("--calib-sentences", type=int, default=256)
    p.add_argument("--calib-per-seed", action="store_true",
                   help="convert and calibrate again for every seed (default: once per rank with the first seed's "
                        "init; later seeds then differ only in the distillation sample order)")
    p.add_argument("--calib-alternate", type=int, default=0, help="extra alternating rounds in calibrate_")
    p.add_argument("--steps", type=int, default=30, help="distillation steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--eval-sentences", type=int, default=200)
    p.add_argument("--minilm-root", default=None)
    p.add_argument("--text-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/minilm")
    p.add_argument("--append", action="store_true", help="merge into an existing runs.json")


# ---------------------------------------------------------------- data
def sentence_sets(text_root, n_eval: int, seed: int = 0):
    """(train sentences, held-out sentences): training works vs the held-out works of the char LM split."""
    from .data.shakespeare import DEFAULT_VAL_WORKS, load_works, split_sentences

    works = load_works(text_root)
    train = [s for w, t in works.items() if w not in DEFAULT_VAL_WORKS for s in split_sentences(t)]
    held = [s for w in DEFAULT_VAL_WORKS if w in works for s in split_sentences(works[w])]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held[:n_eval]


def equal_length_batches(tok, sentences, max_length: int, batch_size: int = 16):
    """Batches (input_ids, attention_mask) whose sentences all have the same token length (no padding)."""
    by_len: dict[int, list[str]] = {}
    for s in sentences:
        ids, _ = tok([s], max_length)
        by_len.setdefault(ids.shape[1], []).append(s)
    out = []
    for _, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            out.append(tok(group[i: i + batch_size], max_length))
    return out


@torch.no_grad()
def embed_all(model, tok, sentences, max_length: int, batch_size: int = 32) -> torch.Tensor:
    model.eval()
    outs = [model.embed(*tok(sentences[i: i + batch_size], max_length)) for i in range(0, len(sentences), batch_size)]
    return torch.cat(outs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks not needed: ties have probability ~0)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def quality(student, teacher_emb, tok, sentences, max_length) -> dict:
    e = embed_all(student, tok, sentences, max_length)
    cos = (e * teacher_emb).sum(-1)
    iu = torch.triu_indices(len(e), len(e), offset=1)
    s_sim = (e @ e.T)[iu[0], iu[1]]
    t_sim = (teacher_emb @ teacher_emb.T)[iu[0], iu[1]]
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "pair_spearman": spearman(s_sim, t_sim)}


# ---------------------------------------------------------------- conversions
def _linear_names(model):
    return model.linear_names()


def _set(model, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def convert_stl(teacher, rank: int, init, seed: int):
    alg = resolve(init, 4, 4, 4, rank, seed)
    student = copy.deepcopy(teacher)
    for name in _linear_names(student):
        _set(student, name, STLinear.from_linear(student.get_submodule(name), init=alg))
    return student


def prune_24(teacher):
    """Copy of ``teacher`` with every block linear pruned to 2 of 4 consecutive input weights (by magnitude).

    Returns (student, masks {name: bool mask}); re-apply masks after each optimizer step.
    """
    student = copy.deepcopy(teacher)
    masks = {}
    for name in _linear_names(student):
        lin = student.get_submodule(name)
        w = lin.weight.detach()
        N, K = w.shape
        if K % 4:
            raise ValueError(f"2:4 pruning needs in_features divisible by 4, {name} has {K}")
        g = w.abs().reshape(N, K // 4, 4)
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(-1, g.topk(2, dim=-1).indices, True)
        mask = keep.reshape(N, K)
        with torch.no_grad():
            lin.weight.mul_(mask)
        masks[name] = mask
    return student, masks


def linear_macs(model, batch) -> dict:
    """Linear-layer MACs on one batch (core + encode + decode for STL; 2:4 layers count half their MACs)."""
    rep = cost.count(model, *batch)
    rows = [r for r in rep.layers if r.kind in ("linear", "stl")]
    return {"linear_macs": sum(r.macs for r in rows), "linear_dense_macs": sum(r.dense_macs for r in rows),
            "linear_macs_core": sum(r.macs_core for r in rows),
            "linear_macs_encdec": sum(r.macs_encode + r.macs_decode for r in rows)}


def distill(student, teacher, tok, train_sents, args, seed: int, masks=None, desc="distill") -> float:
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, args.steps), pct_start=0.1)
    student.train()
    teacher.eval()
    t0 = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=desc, leave=False, mininterval=5):
        ids, mask = tok(rng.sample(train_sents, args.batch_size), args.max_length)
        with torch.no_grad():
            t_tok = teacher(ids, mask)
            m = mask.unsqueeze(-1).float()
            t_emb = F.normalize((t_tok * m).sum(1) / m.sum(1), dim=-1)
        s_tok = student(ids, mask)
        s_emb = F.normalize((s_tok * m).sum(1) / m.sum(1), dim=-1)
        loss = (1 - (s_emb * t_emb).sum(-1)).mean() + \
            ((F.normalize(s_tok, dim=-1) - F.normalize(t_tok, dim=-1)) ** 2 * m).sum() / m.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite distillation loss; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if masks:
            with torch.no_grad():
                for name, mk in masks.items():
                    student.get_submodule(name).weight.mul_(mk)
    student.eval()
    return time.perf_counter() - t0


def run(args) -> int:
    from .data.minilm import Tokenizer
    from .models.bert import load_minilm

    if args.quick:
        args.seeds, args.ranks = args.seeds[:1], args.ranks[:1]
        args.calib_sentences, args.steps, args.eval_sentences, args.batch_size = 24, 2, 24, 4
    torch.set_num_threads(args.threads)
    init = args.init
    if init == "auto":
        init = "als" if "als" in available_inits() else "random"
    teacher = load_minilm(args.minilm_root)
    for p in teacher.parameters():
        p.requires_grad_(False)
    tok = Tokenizer(args.minilm_root)
    train_sents, eval_sents = sentence_sets(args.text_root, args.eval_sentences)
    teacher_emb = embed_all(teacher, tok, eval_sents, args.max_length)
    probe = tok(eval_sents[:8], args.max_length)
    dense_cost = linear_macs(teacher, probe)
    print(f"all-MiniLM-L6-v2; {len(train_sents)} training sentences, {len(eval_sents)} held-out sentences; "
          f"STL ranks {args.ranks} init {init!r}; seeds {args.seeds}; {args.steps} distillation steps")
    records = []
    calibrated: dict[int, tuple] = {}  # rank -> (student, before_calibration, calibration errors, seconds)
    # variants outer, seeds inner: the cheap 2:4 baseline first, then ranks; runs.json is rewritten after every
    # run so an interrupted experiment keeps what it finished
    variants = ([("2:4", None)] if args.with_24 else []) + [(f"stl-r{r}", r) for r in args.ranks]
    for kind, rank in variants:
        for seed in args.seeds:
            torch.manual_seed(seed)
            cseed = seed if args.calib_per_seed else args.seeds[0]
            calib = equal_length_batches(tok, train_sents[-args.calib_sentences - 1000 * cseed:][:args.calib_sentences],
                                         args.max_length)
            t0 = time.perf_counter()
            masks = None
            if rank is not None and rank in calibrated and not args.calib_per_seed:
                student0, before_calib, calib_err, t_cal = calibrated[rank]
                student = copy.deepcopy(student0)
                t0 -= t_cal
            elif rank is not None:
                student = convert_stl(teacher, rank, init, cseed)
                before_calib = quality(student, teacher_emb, tok, eval_sents, args.max_length)
                rep = calibrate_(student, calib, reference=teacher, alternate=args.calib_alternate)
                calib_err = [v for v in (getattr(c, "rel_err_after", None) for c in rep.layers) if v is not None]
                calibrated[rank] = (copy.deepcopy(student), before_calib, calib_err, time.perf_counter() - t0)
            else:
                student, masks = prune_24(teacher)
                before_calib, calib_err = None, []
            for p in student.parameters():
                p.requires_grad_(True)
            convert_s = time.perf_counter() - t0
            before = quality(student, teacher_emb, tok, eval_sents, args.max_length)
            secs = distill(student, teacher, tok, train_sents, args, seed, masks, desc=f"{kind} s{seed}")
            after = quality(student, teacher_emb, tok, eval_sents, args.max_length)
            c = linear_macs(student, probe)
            if rank is None:  # 2:4: half the multiply-accumulates of every pruned linear
                c = {**c, "linear_macs": c["linear_macs"] / 2, "linear_macs_core": c["linear_macs_core"] / 2}
            rec = {"seed": seed, "model": kind, "rank": rank, "init": init if rank else None,
                   "init_seed": cseed if rank else None,
                   "flop_reduction": dense_cost["linear_macs"] / c["linear_macs"], **c,
                   "before_calibration": before_calib, "before_distill": before, **after,
                   "calib_rel_error_mean": (sum(calib_err) / len(calib_err)) if calib_err else None,
                   "convert_seconds": convert_s, "distill_seconds": secs}
            records.append(rec)
            print(f"  seed {seed} {kind}: FLOP reduction {rec['flop_reduction']:.2f}x, cosine "
                  f"{before['cosine_mean']:.4f} -> {after['cosine_mean']:.4f}, Spearman "
                  f"{before['pair_spearman']:.4f} -> {after['pair_spearman']:.4f}", flush=True)
            _write(args, records, init, eval_sents)
    path = _write(args, records, init, eval_sents)
    plot(_merged(args, records), Path(args.out))
    print(table(_merged(args, records)))
    print(f"wrote {path}")
    return 0


def _merged(args, records):
    return read_runs(args.out)["runs"]


def _write(args, records, init, eval_sents):
    meta = {"config": config_of(args), "init": init,
            "scale": f"all-MiniLM-L6-v2 (all 36 block linears converted); calibration on {args.calib_sentences} "
                     f"training-work sentences ({'per seed' if args.calib_per_seed else 'once per rank, init seed ' + str(args.seeds[0])}); "
                     f"distillation {args.steps} steps x {args.batch_size} sentences "
                     f"(max {args.max_length} tokens), AdamW lr {args.lr}; evaluation on {len(eval_sents)} sentences "
                     f"of held-out works ({len(eval_sents) * (len(eval_sents) - 1) // 2} pairs); {args.threads} thread(s)"}
    if args.append:
        records, meta = merge_runs(args.out, records, meta)
    return write_runs(args.out, records, meta)


def table(records: list[dict]) -> str:
    lines = ["| model | seeds | linear FLOP reduction (incl. enc/dec) | cosine before distill | cosine after "
             "| pair Spearman before | pair Spearman after |", "|---|---|---|---|---|---|---|"]
    for kind, rs in group_runs(records).items():
        lines.append(f"| {kind} | {len(rs)} | {mean_std([r['flop_reduction'] for r in rs])[0]:.2f}x "
                     f"| {fmt_ms([r['before_distill']['cosine_mean'] for r in rs])} | {fmt_ms([r['cosine_mean'] for r in rs])} "
                     f"| {fmt_ms([r['before_distill']['pair_spearman'] for r in rs])} | {fmt_ms([r['pair_spearman'] for r in rs])} |")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, rs in group_runs(records).items():
        x = mean_std([r["flop_reduction"] for r in rs])[0]
        for ax, key in zip(axes, ("cosine_mean", "pair_spearman")):
            m, s = mean_std([r[key] for r in rs])
            mb, sb = mean_std([r["before_distill"][key] for r in rs])
            ax.errorbar([x], [m], yerr=[s], fmt="o", capsize=4, label=f"{kind} distilled")
            ax.errorbar([x], [mb], yerr=[sb], fmt="x", capsize=4, alpha=0.6, label=f"{kind} before distill")
    axes[0].set_ylabel("cosine(student, teacher) on held-out sentences")
    axes[1].set_ylabel("Spearman of pair similarities vs teacher")
    for ax in axes:
        ax.set_xlabel("linear-layer FLOP reduction vs dense (incl. encode/decode)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2: STL (t=4) vs 2:4 sparsity, after distillation")
    fig.tight_layout()
    path = out / "quality_vs_flops.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
