"""``strassenkit bench``: wall-clock STL (fast path) vs dense ``F.linear``, forward and training step.

Every row is a problem (M rows, K in-features, N out-features) with tile t=4, rank r=24 (unless
``--tile/--rank``), one dtype, one mode and one thread count:

- forward: ``stl_apply(x, w_hat, enc_x, dec)`` vs ``F.linear(x, w)`` under ``torch.no_grad``
  (the weight is already encoded: encoding happens once, never per call).
- train: forward + backward with gradients for x, w_hat, enc_x, dec vs F.linear forward + backward
  for x and w.

Timing: the dense and STL calls are interleaved inside each repeat, in alternating order (so load
changes hit both, and neither always runs right after the other), after warm-up; the reported time is the median of the repeats. The core-bmm time (the r batched products
alone; in train mode the three bmms of forward + backward) gives the "bmm-only bound"
dense/core and the share of STL time spent outside the core, 1 - core/STL. The FLOP bound is
dense MACs / STL core MACs (n*m*p/r up to padding). Rows where STL is slower are kept.

Outputs (``--out``, default results/bench/): ``bench.json`` (or ``bench_quick.json``), ``bench.md``
(or ``bench_quick.md``) and ``speedup.png`` (``speedup_quick.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .._utils import ceil_div
from ..functional import native
from ..functional.ops import active_backend, backend, bmm, compute_dtype, kernels_label, native_low_precision
from ..functional.stl import stl_apply
from ..runtime import machine_info, retain_freed_memory

__all__ = ["SHAPE_SETS", "QUICK_SETS", "MODEL_SETS", "BenchRow", "ModelRow", "bench_row", "model_rows", "call_rows",
           "run_bench", "run_models", "add_arguments", "run"]

# name -> list of (M, K, N, dtypes, thread counts); M counts rows (tokens), grouped as (M/64, 64, K)
# for the row tiles when M is a multiple of 64 (a batch of sequences), else one matrix.
_BOTH = (1, 2)
SHAPE_SETS: dict[str, list[tuple[int, int, int, tuple[str, ...], tuple[int, ...]]]] = {
    "square": [
        (512, 512, 512, ("float32", "bfloat16"), _BOTH),
        (1024, 1024, 1024, ("float32", "bfloat16"), _BOTH),
        (2048, 2048, 2048, ("float32",), (2,)),
        (4096, 4096, 4096, ("float32",), (2,)),
    ],
    "vit": [(12608, 768, 3072, ("float32",), (2,)), (12608, 3072, 768, ("float32",), (2,))],
    "llm": [(4096, 4096, 11008, ("float32",), (2,))],
    "small_batch": [(16, 4096, 4096, ("float32",), _BOTH)],
    # the goal rows of issues 6 and 16 only (run them several times with --runs to see the run-to-run spread)
    "goals": [(4096, 4096, 4096, ("float32",), (2,)), (6400, 128, 512, ("float32",), (1,)),
              (6400, 192, 768, ("float32",), (1,)), (6400, 256, 1024, ("float32",), (1,)),
              (6400, 384, 1536, ("float32",), (1,))],
    "small_width": [
        (6400, 128, 512, ("float32", "bfloat16"), _BOTH),
        (6400, 512, 128, ("float32",), _BOTH),
        (6400, 192, 768, ("float32",), _BOTH),
        (6400, 256, 1024, ("float32",), _BOTH),
        (6400, 384, 1536, ("float32",), _BOTH),
        (6400, 1536, 384, ("float32",), _BOTH),
    ],
}
QUICK_SETS = {
    "square": [(512, 512, 512, ("float32", "bfloat16"), _BOTH), (1024, 1024, 1024, ("float32",), _BOTH)],
    "small_width": [(6400, 128, 512, ("float32",), _BOTH)],
}


@dataclass
class BenchRow:
    set: str
    M: int
    K: int
    N: int
    dtype: str
    compute_dtype: str
    mode: str
    threads: int
    dense_ms: float
    stl_ms: float
    core_ms: float
    speedup: float
    flop_bound: float
    bmm_bound: float
    outside_core_share: float
    repeats: int
    dense_upcast_ms: float | None = None  # low precision only: dense computed in the compute dtype
    speedup_vs_upcast: float | None = None
    kernels: str = "torch"  # which STL kernels ran: "native" (C++) or "torch" (pure PyTorch)
    speedup_min: float | None = None  # min / max over repeats of dense_i / stl_i (same repeat)
    speedup_max: float | None = None
    run: int = 0  # index of the pass over the shape sets (--runs)
    malloc: str = "default"  # "retain": freed memory kept in the process (strassenkit.runtime), for dense and STL


def _interleaved(fns: list, repeats: int, warmup: int) -> list[list[float]]:
    """Per-candidate lists of ``repeats`` wall times (seconds), candidates interleaved per repeat."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(repeats):  # alternate the order so no candidate always runs right after another
        order = list(enumerate(fns))
        for i, f in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return times


def _ratio_spread(dense: list[float], stl: list[float]) -> tuple[float, float]:
    """Min and max over repeats of the same-repeat ratio dense_i / stl_i (how noisy the speedup is)."""
    ratios = [d / s for d, s in zip(dense, stl)]
    return min(ratios), max(ratios)


def bench_row(
    set_name: str, M: int, K: int, N: int, dtype: str, mode: str, threads: int,
    tile: int = 4, rank: int = 24, repeats: int = 5, warmup: int = 1, seed: int = 0, kernels: str = "auto",
) -> BenchRow:
    """Time one (shape, dtype, mode, threads) row with STL ``kernels`` ("auto", "native" or "torch")."""
    if mode not in ("forward", "train"):
        raise ValueError(f"mode must be 'forward' or 'train', got {mode!r}")
    with backend(kernels):
        return _bench_row(set_name, M, K, N, dtype, mode, threads, tile, rank, repeats, warmup, seed)


def _bench_row(set_name, M, K, N, dtype, mode, threads, tile, rank, repeats, warmup, seed) -> BenchRow:
    dt = getattr(torch, dtype)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        L = 64 if M % 64 == 0 else M
        x = torch.randn(M // L, L, K, generator=g).to(dt)
        w = (torch.randn(N, K, generator=g) / K**0.5).to(dt)
        n = m = p = tile
        Kt, Nt, Mt = ceil_div(K, m), ceil_div(N, p), (M // L) * ceil_div(L, n)
        w_hat = (torch.randn(rank, Kt, Nt, generator=g) / Kt**0.5).to(dt)
        enc_x = (torch.randn(rank, n * m, generator=g) / (n * m) ** 0.5).to(dt)
        dec = (torch.randn(n * p, rank, generator=g) / rank**0.5).to(dt)
        cdt = compute_dtype(dt, "cpu")
        x_hat = torch.randn(rank, Mt, Kt, generator=g).to(cdt)
        w_core = w_hat.to(cdt)
        gy = torch.randn(M // L, L, N, generator=g).to(dt)
        if mode == "forward":
            def dense():
                with torch.no_grad():
                    F.linear(x, w)

            def stl():
                with torch.no_grad():
                    stl_apply(x, w_hat, enc_x, dec, tile, N)

            def core():
                bmm(x_hat, w_core)

            def dense_up():
                with torch.no_grad():
                    F.linear(x.to(cdt), w.to(cdt)).to(dt)
        else:
            xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
            ps = [t.clone().requires_grad_() for t in (x, w_hat, enc_x, dec)]
            g_prod = torch.randn(rank, Mt, Nt, generator=g).to(cdt)

            def dense():
                xd.grad = wd.grad = None
                F.linear(xd, wd).backward(gy)

            def stl():
                for t in ps:
                    t.grad = None
                stl_apply(*ps, tile, N).backward(gy)

            def core():
                bmm(x_hat, w_core)
                bmm(g_prod, w_core.transpose(1, 2))
                bmm(x_hat.transpose(1, 2), g_prod)

            def dense_up():  # the casts are part of the graph, as they would be in a bf16 model
                xd.grad = wd.grad = None
                F.linear(xd.to(cdt), wd.to(cdt)).to(dt).backward(gy)
        fns = [dense, stl, core] + ([dense_up] if cdt != dt else [])
        times = _interleaved(fns, repeats, warmup)
        d, s, c, *up = (statistics.median(t) for t in times)
        lo, hi = _ratio_spread(times[0], times[1])
    finally:
        torch.set_num_threads(old_threads)
    core_macs = rank * Mt * Kt * Nt
    return BenchRow(
        set=set_name, M=M, K=K, N=N, dtype=dtype, compute_dtype=str(cdt).replace("torch.", ""), mode=mode,
        threads=threads, dense_ms=d * 1e3, stl_ms=s * 1e3, core_ms=c * 1e3, speedup=d / s,
        flop_bound=M * K * N / core_macs, bmm_bound=d / c, outside_core_share=max(0.0, 1 - c / s), repeats=repeats,
        dense_upcast_ms=up[0] * 1e3 if up else None, speedup_vs_upcast=up[0] / s if up else None,
        kernels=kernels_label(cdt, "cpu"), speedup_min=lo, speedup_max=hi,
    )


# --------------------------------------------------------------------------- whole models and per-call cost
# Sets that time whole converted models rather than one layer. Each entry: (name, builder, threads). A
# builder returns (dense model, example inputs as a dict of keyword arguments or a tensor, attention MACs
# per sample, goal ratio for inference or None). The STL model is the dense one converted by strassenify_
# with STLConfig(tile, rank): what a user gets.
MODEL_SETS: dict[str, list[str]] = {"models": ["vit_b", "minilm"], "overhead": ["call"]}


@dataclass
class ModelRow:
    set: str
    model: str
    shape: str
    mode: str
    threads: int
    dense_ms: float
    stl_ms: float
    speedup: float
    speedup_min: float
    speedup_max: float
    flop_bound: float  # (dense linear MACs + attention) / (STL MACs incl. encode/decode + attention)
    linears: int  # converted layers
    repeats: int
    kernels: str
    malloc: str = "default"
    run: int = 0
    goal: float | None = None


def _vit_b():
    """A ViT-B-size encoder: 12 pre-LN blocks, d=768, MLP 3072, 12 heads, SDPA; 8 images x 197 tokens."""
    from torch import nn

    from .._models.vit import Block

    torch.manual_seed(0)
    model = nn.Sequential(*[Block(768, 12, 4.0, lambda i, o: nn.Linear(i, o)) for _ in range(12)])
    x = torch.randn(8, 197, 768)
    return model, x, 12 * 2 * 197 * 197 * 768, 2.0, "12 blocks d=768 mlp=3072, 8 x 197 tokens"


def _minilm():
    """all-MiniLM-L6-v2's shape (BertModel: 6 layers, d=384, MLP 1536, 12 heads, SDPA), random weights; 32 x 128 tokens."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, attn_implementation="sdpa")
    model = BertModel(cfg, add_pooling_layer=False)  # as in the MiniLM experiment: every linear is a block linear
    ids = torch.randint(1000, 30000, (32, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}, 6 * 2 * 128 * 128 * 384, 1.5, "BertModel 6 layers d=384 mlp=1536, 32 x 128 tokens"


_MODELS = {"vit_b": _vit_b, "minilm": _minilm}


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _batch_of(inputs, n: int):
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def model_rows(name: str, modes=("forward", "train"), threads=2, tile=4, rank=24, repeats=5, warmup=1,
               set_name="models") -> list[ModelRow]:
    """Dense vs converted model ``name`` (see _MODELS): inference (no grad) and/or a training step."""
    import copy

    from .. import cost
    from ..surgery import STLConfig, strassenify_

    dense, inputs, attn_macs, goal, shape = _MODELS[name]()
    stl = copy.deepcopy(dense)
    # head=None: these models have no output head; "auto" would keep the last block's last linear dense
    converted = strassenify_(stl, STLConfig(tile=tile, rank=rank, keep_dense_weight=False), head=None)
    one = _batch_of(inputs, 1)  # MACs per sample (attn_macs is per sample too)

    def linear_macs(model):
        with torch.no_grad():
            rep = cost.count(model.eval(), **one) if isinstance(one, dict) else cost.count(model.eval(), one)
        return sum(c.macs for c in rep.layers if c.kind in ("linear", "stl"))

    bound = (linear_macs(dense) + attn_macs) / (linear_macs(stl) + attn_macs)
    rows = []
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mode in modes:
            if mode == "forward":
                dense.eval(), stl.eval()

                def run_d():
                    with torch.no_grad():
                        _call(dense, inputs)

                def run_s():
                    with torch.no_grad():
                        _call(stl, inputs)
            else:
                dense.train(), stl.train()

                def step(model):
                    def f():
                        for p in model.parameters():
                            p.grad = None
                        _call(model, inputs).float().pow(2).mean().backward()
                    return f

                run_d, run_s = step(dense), step(stl)
            times = _interleaved([run_d, run_s], repeats, warmup)
            d, s = statistics.median(times[0]), statistics.median(times[1])
            lo, hi = _ratio_spread(times[0], times[1])
            rows.append(ModelRow(set=set_name, model=name, shape=shape, mode=mode, threads=threads, dense_ms=d * 1e3,
                                 stl_ms=s * 1e3, speedup=d / s, speedup_min=lo, speedup_max=hi, flop_bound=bound,
                                 linears=len(converted), repeats=repeats, kernels=active_backend(torch.float32, "cpu"),
                                 goal=goal if mode == "forward" else None))
    finally:
        torch.set_num_threads(old)
    return rows


def call_rows(repeats: int = 2000, set_name: str = "overhead") -> list[ModelRow]:
    """Per-call cost of one tiny layer (1 x 4 x 8 -> 8): nn.Linear vs STLinear, no-grad call and training step."""
    from torch import nn

    from ..nn.stlinear import STLinear

    torch.manual_seed(0)
    dense, stl = nn.Linear(8, 8), STLinear(8, 8, tile=4, rank=24)
    x = torch.randn(1, 4, 8)
    xg = x.clone().requires_grad_()
    rows = []
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode in ("forward", "train"):
            if mode == "forward":
                def mk(m):
                    def f():
                        with torch.no_grad():
                            m(x)
                    return f
            else:
                def mk(m):
                    def f():
                        m(xg).sum().backward()
                    return f
            times = _interleaved([mk(dense), mk(stl)], repeats, 50)
            d, s = statistics.median(times[0]), statistics.median(times[1])
            rows.append(ModelRow(set=set_name, model="one layer 8 -> 8 (per call)", shape="1 x 4 x 8", mode=mode,
                                 threads=1, dense_ms=d * 1e3, stl_ms=s * 1e3, speedup=d / s, speedup_min=float("nan"),
                                 speedup_max=float("nan"), flop_bound=float("nan"), linears=1, repeats=repeats,
                                 kernels=active_backend(torch.float32, "cpu")))
    finally:
        torch.set_num_threads(old)
    return rows


def _model_markdown(rows: list[ModelRow]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Whole models and per-call cost", "",
             "Dense model vs the same model converted by `strassenify_(model, STLConfig(tile=4, rank=24))` "
             "(every linear layer an STLinear), interleaved repeats, median; flop bound = (dense linear MACs + "
             "attention) / (STL MACs incl. encode/decode + attention). The per-call rows time one tiny layer "
             "(1 x 4 x 8 -> 8) to show the fixed cost of a call (microseconds).", "",
             "| run | set | model | shape | mode | threads | malloc | dense | STL | speedup | flop bound | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_call = r.set == "overhead"
        unit = (lambda v: f"{v * 1e3:.1f} us") if per_call else (lambda v: f"{v:.0f} ms")
        spread = "" if per_call else f" ({r.speedup_min:.2f}-{r.speedup_max:.2f})"
        goal = "-" if r.goal is None else (f">= {r.goal}x: " + ("**met**" if r.speedup >= r.goal else "missed"))
        bound = "-" if per_call else f"{r.flop_bound:.2f}"
        lines.append(f"| {r.run} | {r.set} | {r.model} | {r.shape} | {r.mode} | {r.threads} | {r.malloc} | "
                     f"{unit(r.dense_ms)} | {unit(r.stl_ms)} | **{r.speedup:.2f}x**{spread} | {bound} | {goal} |")
    if len({r.run for r in rows}) > 1:  # the goal is judged on the median over runs (separate passes)
        groups: dict[tuple, list[ModelRow]] = {}
        for r in rows:
            groups.setdefault((r.set, r.model, r.mode, r.threads, r.malloc), []).append(r)
        lines += ["", f"Across the {len({r.run for r in rows})} runs (speedup per run, then the median):", "",
                  "| set | model | mode | threads | malloc | speedups | median | goal |", "|---|---|---|---|---|---|---|---|"]
        for (set_, model, mode, threads, malloc), rs in groups.items():
            med = statistics.median(r.speedup for r in rs)
            goal = rs[0].goal
            verdict = "-" if goal is None else f">= {goal}x: " + ("**met**" if med >= goal else "missed")
            lines.append(f"| {set_} | {model} | {mode} | {threads} | {malloc} | "
                         f"{', '.join(f'{r.speedup:.2f}' for r in rs)} | **{med:.2f}x** | {verdict} |")
    return lines


_machine_info = machine_info  # the bench header's fields (kept under the old private name)


def _break_even(rows: list[BenchRow]) -> dict:
    """Smallest dense-MAC count from which every larger measured square row has speedup >= 1."""
    out = {}
    for dtype in sorted({r.dtype for r in rows}):
        for mode in ("forward", "train"):
            best: dict[int, float] = {}
            for r in rows:
                if (r.set == "square" and r.dtype == dtype and r.mode == mode and r.kernels == rows[0].kernels
                        and r.malloc == rows[0].malloc and r.run == 0):
                    best[r.M] = max(best.get(r.M, 0.0), r.speedup)
            if not best:
                continue
            sizes = sorted(best)
            be = None
            for i, s in enumerate(sizes):
                if all(best[z] >= 1.0 for z in sizes[i:]):
                    be = s
                    break
            out[f"{dtype}/{mode}"] = (
                f"square {be}^3" if be is not None else f"not reached up to {sizes[-1]}^3"
            )
    return out


def run_bench(
    sets: dict, modes=("forward", "train"), tile=4, rank=24, repeats=5, threads=None, progress=True, kernels=("auto",),
    runs=1, mallocs=("default",),
):
    """Run every row of ``sets`` once per entry of ``kernels`` and ``mallocs``, ``runs`` times over.

    Returns (rows, info). ``threads`` overrides the per-row thread counts. ``mallocs``: "default" (glibc's
    default thresholds) and/or "retain" (:func:`strassenkit.runtime.retain_freed_memory`, which
    applies to dense and STL alike); the setting is switched before each row that needs another one.
    """
    from tqdm import tqdm

    jobs = [
        (name, M, K, N, dtype, mode, th, kern, run, mem)
        for run in range(runs)
        for name, shapes in sets.items()
        for M, K, N, dtypes, ths in shapes
        for dtype in dtypes
        for mode in modes
        for th in threads or ths
        for kern in kernels
        for mem in mallocs
    ]
    info = _machine_info()
    rows = []
    current = "default"  # the allocator is only touched when "retain" is asked for
    try:
        for job in tqdm(jobs, desc="bench", disable=not progress):
            name, M, K, N, dtype, mode, th, kern, run, mem = job
            if mem != current:
                if not retain_freed_memory(mem == "retain"):
                    raise RuntimeError("--malloc retain needs glibc's mallopt, which this system does not have")
                current = mem
            big = M * K * N >= 2**36
            row = bench_row(name, M, K, N, dtype, mode, th, tile, rank, repeats=max(3, repeats - 2) if big else repeats, kernels=kern)
            row.run, row.malloc = run, mem
            rows.append(row)
    finally:  # leave the allocator as the bench found it, also when a row fails
        if current != "default":
            retain_freed_memory(False)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["break_even"] = _break_even(rows)
    return rows, info


def run_models(names, modes=("forward", "train"), tile=4, rank=24, repeats=5, threads=None, runs=1,
               mallocs=("default",), progress=True, call_repeats=2000) -> list[ModelRow]:
    """The whole-model sets ``names`` (keys of MODEL_SETS), ``runs`` times, under each allocator setting."""
    from tqdm import tqdm

    jobs = [(run, name, model, mem) for run in range(runs) for name in names for model in MODEL_SETS[name]
            for mem in mallocs]
    rows: list[ModelRow] = []
    current = "default"
    try:
        for run, name, model, mem in tqdm(jobs, desc="models", disable=not progress):
            if mem != current:
                if not retain_freed_memory(mem == "retain"):
                    raise RuntimeError("--malloc retain needs glibc's mallopt, which this system does not have")
                current = mem
            if model == "call":
                new = call_rows(call_repeats, set_name=name)
            else:
                new = []
                for th in threads or (2,):
                    for mode in modes:  # training steps of whole models are long: fewer repeats
                        new += model_rows(model, (mode,), th, tile, rank, min(repeats, 5) if mode == "forward" else 3,
                                          set_name=name)
            for r in new:
                r.run, r.malloc = run, mem
            rows += new
    finally:
        if current != "default":
            retain_freed_memory(False)
    return rows


def _markdown(rows: list[BenchRow], info: dict, command: str) -> str:
    lines = [
        "# STL vs dense F.linear: wall-clock on this machine",
        "",
        f"Regenerate: `{command}`",
        "",
        f"- CPU: {info['cpu']} ({info['cores']} cores), SIMD flags: {', '.join(info['simd']) or 'n/a'}; "
        f"torch {info['torch']} (CPU capability {info['cpu_capability']}); native bf16 GEMM: {info['native_bf16_gemm']}",
        f"- native STL kernels: code path **{info.get('native_code_path', '?')}** (ISA / vector bits, chosen for this "
        f"CPU at load time; compiled with `{info.get('native_flags', '')}`); the fused path (encode, core and decode "
        "per block of tile rows) runs layers with a small encoded weight, see results/bench/README.md",
        f"- load average (1, 5, 15 min) at start {info['loadavg_start']}, at end {info['loadavg_end']} "
        "(a lagging 1-minute average; on a shared VM absolute times are noisy: dense and STL are interleaved per "
        "repeat, so the ratios are the figures to read)",
        f"- THP_MEM_ALLOC_ENABLE={info.get('THP_MEM_ALLOC_ENABLE', 'unset')} (PyTorch's transparent-huge-page "
        "switch for large CPU tensors; `make bench` leaves it unset, as in a plain process; set to 1 it gives dense "
        "outputs huge pages too: the STL native kernels request them for their own outputs either way)",
        "- malloc: `default` = glibc's default thresholds (every large tensor is a fresh mmap, faulted in and zeroed on first "
        "touch); `retain` = freed memory kept in the process (`strassenkit.runtime.retain_freed_memory`, what a "
        "caching allocator such as tcmalloc/jemalloc does; PyTorch's `torch.backends.xeon.run_cpu` launcher preloads "
        "one by default). The setting applies to dense and STL alike",
        "- kernels: `native` = the C++ STL kernels (strassenkit.functional.native), `torch` = the pure-PyTorch "
        "fallback; dense is always `F.linear`",
        "- t=4, r=24 tiles (4x4 row tiles grouped inside sequences of 64 rows); median of repeats after warm-up",
        "- speedup = dense / STL (medians), with the min-max over repeats of the same-repeat ratio in brackets; flop bound = dense MACs / STL core MACs; bmm bound = dense / core-bmm time; "
        "outside = share of STL time outside the core bmm(s)",
        "- bf16 rows: compute dtype shows what the fast path computes in (float32 on CPUs without native bf16 GEMMs); "
        "dense is native bf16 F.linear. When the compute dtype differs, the last column compares against dense "
        "computed the same way (cast to float32, F.linear, cast back): that is the fair algorithmic comparison",
    ]
    if rows:
        lines += [
            "",
            "Break-even (square shapes, best thread count): "
            + "; ".join(f"{k}: {v}" for k, v in info["break_even"].items()),
            "",
            "| run | set | M x K x N | dtype (compute) | mode | threads | kernels | malloc | dense ms | STL ms | speedup | flop bound | bmm bound | outside core | vs dense in compute dtype |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        lines.append(
            f"| {r.run} | {r.set} | {r.M}x{r.K}x{r.N} | {r.dtype} ({r.compute_dtype}) | {r.mode} | {r.threads} | {r.kernels} | {r.malloc} | "
            f"{r.dense_ms:.1f} | {r.stl_ms:.1f} | **{r.speedup:.2f}x**{_spread(r)} | {r.flop_bound:.2f} | {r.bmm_bound:.2f} | "
            f"{100 * r.outside_core_share:.0f}% | "
            + (f"{r.speedup_vs_upcast:.2f}x ({r.dense_upcast_ms:.1f} ms) |" if r.speedup_vs_upcast else "- |")
        )
    runs = sorted({r.run for r in rows})
    if len(runs) > 1:
        lines += ["", f"Across the {len(runs)} runs (speedup per run, then the median):", "",
                  "| set | M x K x N | dtype | mode | threads | kernels | malloc | speedups | median |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            key = (r.set, f"{r.M}x{r.K}x{r.N}", r.dtype, r.mode, r.threads, r.kernels, r.malloc)
            groups.setdefault(key, []).append(r.speedup)
        for key, sp in groups.items():
            lines.append("| " + " | ".join(str(k) for k in key) + f" | {', '.join(f'{v:.2f}' for v in sp)} | "
                         f"**{statistics.median(sp):.2f}x** |")
    return "\n".join(lines) + "\n"


def _spread(r: BenchRow) -> str:
    return f" ({r.speedup_min:.2f}-{r.speedup_max:.2f})" if r.speedup_min is not None else ""


def _best_threads(rows: list[BenchRow]) -> list[BenchRow]:
    """For every (set, shape, dtype, mode, kernels), the row of the thread count with the best speedup."""
    best: dict[tuple, BenchRow] = {}
    for r in rows:
        key = (r.set, r.M, r.K, r.N, r.dtype, r.mode, r.kernels, r.malloc, r.run)
        if key not in best or r.speedup > best[key].speedup:
            best[key] = r
    return list(best.values())


def _plot(rows: list[BenchRow], path: Path) -> None:
    """fp32 speedup vs size (square shapes as lines, other sets as markers); bf16 vs dense in the compute dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _best_threads(rows)
    low = [r for r in rows if r.speedup_vs_upcast is not None]
    fig, axes = plt.subplots(1, 2 if low else 1, figsize=(12 if low else 7, 5), squeeze=False)
    ax = axes[0][0]
    markers = {"square": "o", "vit": "^", "llm": "D", "small_batch": "v", "small_width": "s", "goals": "X"}
    colors = {}
    for r in sorted(rows, key=lambda r: r.M * r.K * r.N):
        if r.speedup_vs_upcast is not None:
            continue
        key = (r.mode, r.kernels, r.malloc)
        color = colors.setdefault(key, f"C{len(colors)}")
        ax.errorbar(
            r.M * r.K * r.N, r.speedup,
            yerr=[[r.speedup - (r.speedup_min or r.speedup)], [(r.speedup_max or r.speedup) - r.speedup]],
            fmt=markers.get(r.set, "x"), color=color, alpha=0.8, ms=6, capsize=2,
        )
    several_mallocs = len({r.malloc for r in rows}) > 1
    for (mode, kern, mem), color in colors.items():
        sq = sorted((r for r in rows if r.set == "square" and r.speedup_vs_upcast is None
                     and (r.mode, r.kernels, r.malloc) == (mode, kern, mem)), key=lambda r: r.M)
        ax.plot([r.M * r.K * r.N for r in sq], [r.speedup for r in sq], "-" if mode == "forward" else "--", color=color,
                label=f"{mode}, {kern} kernels" + (f", malloc {mem}" if several_mallocs else ""))
    for name, mk in markers.items():
        if any(r.set == name for r in rows):
            ax.plot([], [], mk, color="gray", label=name)
    ax.axhline(1.0, color="k", lw=1)
    if rows:
        ax.axhline(rows[0].flop_bound, color="gray", ls=":", label=f"FLOP bound {rows[0].flop_bound:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("dense MACs (M*K*N)")
    ax.set_ylabel("speedup = dense F.linear time / STL time")
    ax.set_title("float32, best of 1/2 threads (bars: min-max over repeats)")
    ax.legend(fontsize=7)
    if low:
        ax = axes[0][1]
        for kern, mem in sorted({(r.kernels, r.malloc) for r in low}):
            for mode in ("forward", "train"):
                rs = sorted((r for r in low if (r.kernels, r.malloc, r.mode) == (kern, mem, mode)), key=lambda r: r.M * r.K * r.N)
                ax.plot([r.M * r.K * r.N for r in rs], [r.speedup_vs_upcast for r in rs],
                        "o-" if mode == "forward" else "s--", label=f"{mode}, {kern} kernels, malloc {mem}")
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("dense MACs (M*K*N)")
        ax.set_ylabel("dense (in compute dtype) time / STL time")
        ax.set_title(f"{low[0].dtype} inputs, computed in {low[0].compute_dtype} (no native bf16 GEMM here)")
        ax.legend(fontsize=7)
    fig.suptitle("STL t=4 r=24 vs dense")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shape set (about a minute)")
    parser.add_argument("--sets", default=None, help=f"comma-separated shape sets from {sorted([*SHAPE_SETS, *MODEL_SETS])}")
    parser.add_argument("--modes", default="forward,train", help="forward,train")
    parser.add_argument("--threads", default=None, help="override thread counts, e.g. 1,2 (default: per row)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row (2 fewer, at least 3, for the largest rows)")
    parser.add_argument(
        "--kernels", default="auto",
        help="STL kernels to time, comma-separated from auto,native,torch (e.g. native,torch to compare)",
    )
    parser.add_argument(
        "--malloc", default="default",
        help="allocator settings to time, comma-separated from default,retain (retain: freed memory kept in the "
             "process, see strassenkit.runtime; for dense and STL alike)",
    )
    parser.add_argument("--runs", type=int, default=1, help="passes over all rows (run-to-run spread)")
    parser.add_argument("--tile", type=int, default=4)
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--out", default="results/bench", help="output folder")
    parser.add_argument("--name", default="bench", help="file stem of the outputs (<name>.json, <name>.md, <name>_speedup.png)")


def run(args: argparse.Namespace) -> int:
    pool = QUICK_SETS if args.quick else SHAPE_SETS
    model_sets = ["overhead"] if args.quick else list(MODEL_SETS)
    if args.sets:
        names = [s.strip() for s in args.sets.split(",") if s.strip()]
        bad = [s for s in names if s not in SHAPE_SETS and s not in MODEL_SETS]
        if bad:
            raise SystemExit(f"--sets: unknown shape set(s) {bad}; choose from {sorted([*SHAPE_SETS, *MODEL_SETS])}")
        pool = {s: (QUICK_SETS if args.quick else SHAPE_SETS).get(s, SHAPE_SETS[s]) for s in names if s in SHAPE_SETS}
        model_sets = [s for s in names if s in MODEL_SETS]
    modes = tuple(s.strip() for s in args.modes.split(",") if s.strip())
    if not modes or any(m not in ("forward", "train") for m in modes):
        raise SystemExit(f"--modes must be a comma-separated subset of forward,train, got {args.modes!r}")
    threads = [int(v) for v in args.threads.split(",")] if args.threads else None
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    kernels = tuple(s.strip() for s in getattr(args, "kernels", "auto").split(",") if s.strip())
    if not kernels or any(k not in ("auto", "native", "torch") for k in kernels):
        raise SystemExit(f"--kernels must be a comma-separated subset of auto,native,torch, got {args.kernels!r}")
    runs = getattr(args, "runs", 1)
    if runs < 1:
        raise SystemExit("--runs must be >= 1")
    mallocs = tuple(s.strip() for s in getattr(args, "malloc", "default").split(",") if s.strip())
    if not mallocs or any(m not in ("default", "retain") for m in mallocs):
        raise SystemExit(f"--malloc must be a comma-separated subset of default,retain, got {args.malloc!r}")
    rows, info = run_bench(pool, modes, args.tile, args.rank, args.repeats, threads, kernels=kernels, runs=runs,
                           mallocs=mallocs)
    mrows = run_models(model_sets, modes, args.tile, args.rank, args.repeats, threads, runs, mallocs,
                       call_repeats=300 if args.quick else 2000)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = getattr(args, "name", "bench") or "bench"
    suffix = "_quick" if args.quick else ""
    cmd = "strassenkit bench" + (" --quick" if args.quick else "")
    if name != "bench":
        cmd += f" --name {name}"
    if args.sets:
        cmd += f" --sets {args.sets}"
    if args.threads:
        cmd += f" --threads {args.threads}"
    if getattr(args, "kernels", "auto") != "auto":
        cmd += f" --kernels {args.kernels}"
    if mallocs != ("default",):
        cmd += f" --malloc {','.join(mallocs)}"
    if runs > 1:
        cmd += f" --runs {runs}"
    payload = {"command": cmd, "tile": args.tile, "rank": args.rank, "machine": info, "rows": [asdict(r) for r in rows],
               "model_rows": [asdict(r) for r in mrows]}
    (out / f"{name}{suffix}.json").write_text(json.dumps(payload, indent=1))
    md = _markdown(rows, info, cmd) + "\n".join(_model_markdown(mrows)) + ("\n" if mrows else "")
    (out / f"{name}{suffix}.md").write_text(md)
    if rows:
        _plot(rows, out / (f"speedup{suffix}.png" if name == "bench" else f"{name}{suffix}_speedup.png"))
    print(md)
    return 0
