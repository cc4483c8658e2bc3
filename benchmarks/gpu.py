"""One-command GPU benchmark: dense ``F.linear`` (cuBLAS) vs STL in bf16, forward and training step.

    python benchmarks/gpu.py                 # on a CUDA machine, <= 8 min on one H200
    python benchmarks/gpu.py --dry-run       # every code path at tiny sizes on the CPU (writes to a temp dir)

Writes ``results/bench/gpu.json`` and ``results/bench/gpu.md`` (``--out`` to change the folder) with the
GPU name, torch / CUDA / Triton versions and one row per (shape, rank, mode, STL kernels):

- shapes: square 4096^3 and 8192^3; an LLM MLP (4096 -> 11008 and 11008 -> 4096, 8192 tokens as
  4 x 2048); a ViT-B MLP (768 -> 3072 and 3072 -> 768, 64 images x 197 tokens);
- STL t=4 with r=24 (random codec: the 2.67x FLOP bound) and the exact r=49 Strassen x Strassen
  codec (weight encoded from the dense one; its output is checked against F.linear);
- modes: forward (no grad) and training step (forward + backward: grads of x and w for dense; of x,
  w_hat, enc_x, dec for STL);
- STL kernels: ``triton`` (fused gather+encode and decode+scatter kernels, core ``torch.bmm``) and
  ``torch`` (the pure-PyTorch reference path), so the gain of the fused kernels is visible too.

Per row: dense ms, STL ms, the same-run ratio dense/STL (interleaved repeats, median; min-max of the
same-repeat ratio), the FLOP bound (dense MACs / STL core MACs, padding included), the core-only bound
(dense / the core bmm(s) alone), and the share of STL time outside the core GEMM(s); forward rows
also time encode and decode alone. CUDA events time ``inner`` back-to-back calls per sample.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry-run" in sys.argv:
    # the dry run runs the Triton kernels in Triton's CPU interpreter: set before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from strassenkit.algorithms import get as get_algorithm  # noqa: E402
from strassenkit.functional import ops, triton_stl  # noqa: E402
from strassenkit.functional.stl import stl_apply, stl_encode_weight  # noqa: E402

# name -> (B, L, K, N): x is (B, L, K), rows tiled along L inside each sample
SHAPES = {
    "square_4096": (64, 64, 4096, 4096),
    "square_8192": (128, 64, 8192, 8192),
    "llm_mlp_up": (4, 2048, 4096, 11008),
    "llm_mlp_down": (4, 2048, 11008, 4096),
    "vit_b_mlp_fc1": (64, 197, 768, 3072),
    "vit_b_mlp_fc2": (64, 197, 3072, 768),
}
DRY_SHAPES = {  # same names, tiny (ragged on purpose: 197 -> 13 rows, 11008 -> 44)
    "square_4096": (2, 8, 16, 16),
    "square_8192": (2, 16, 32, 32),
    "llm_mlp_up": (1, 16, 16, 44),
    "llm_mlp_down": (1, 16, 44, 16),
    "vit_b_mlp_fc1": (2, 13, 16, 24),
    "vit_b_mlp_fc2": (2, 13, 24, 16),
}
RANKS = {24: "random", 49: "strassen_x_strassen"}
GOAL = {"shape": "square_8192", "rank": 24, "mode": "forward", "kernels": "triton", "speedup": 1.5}
DEFAULT_BUDGET_S = 450.0  # stop starting new rows after this (the whole run must stay under 8 min)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, inner: int) -> float:
    """Seconds per call of ``fn``, over ``inner`` back-to-back calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure(fns: dict, device: torch.device, repeats: int, warmup: int, target_s: float) -> dict[str, list[float]]:
    """Per-name lists of ``repeats`` times (s); the candidates are interleaved, order alternating per repeat."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    _sync(device)
    inner = {}
    for k, f in fns.items():  # enough calls per sample that one sample lasts about target_s
        t = _time(f, device, 1)
        inner[k] = max(1, min(50, int(target_s / max(t, 1e-7))))
    times = {k: [] for k in fns}
    names = list(fns)
    for rep in range(repeats):
        for k in names if rep % 2 == 0 else names[::-1]:
            times[k].append(_time(fns[k], device, inner[k]))
    return times


def _operands(B, L, K, N, rank, dtype, device, seed=0):
    t = 4
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(B, L, K).to(device=device, dtype=dtype)
    w = (rnd(N, K) / K**0.5).to(device=device, dtype=dtype)
    Kt, Nt = -(-K // t), -(-N // t)
    if RANKS[rank] == "random":
        enc_x = (rnd(rank, t * t) / t).to(device=device, dtype=dtype)
        dec = (rnd(t * t, rank) / rank**0.5).to(device=device, dtype=dtype)
        w_hat = (rnd(rank, Kt, Nt) / Kt**0.5).to(device=device, dtype=dtype)
    else:  # exact: encode the dense weight with Strassen x Strassen (entries in {-1, 0, 1}: exact in bf16)
        alg = get_algorithm(RANKS[rank])
        e_x, e_w, d = (m.to(device=device, dtype=torch.float32) for m in alg.stl_matrices())
        enc_x, dec = e_x.to(dtype), d.to(dtype)
        w_hat = stl_encode_weight(w.float().T, e_w, 4).to(dtype)
    return x, w, w_hat, enc_x, dec


def bench_row(name, shape, rank, mode, kernels, dtype, device, repeats, warmup, target_s) -> dict:
    B, L, K, N = shape
    t = 4
    x, w, w_hat, enc_x, dec = _operands(B, L, K, N, rank, dtype, device)
    Mt, Kt, Nt = -(-L // t), -(-K // t), -(-N // t)
    cdt = ops.compute_dtype(dtype, device.type)
    row = {"shape": name, "B": B, "L": L, "M": B * L, "K": K, "N": N, "tile": t, "rank": rank, "codec": RANKS[rank],
           "mode": mode, "dtype": str(dtype).replace("torch.", ""), "compute_dtype": str(cdt).replace("torch.", "")}
    with ops.backend(kernels):
        row["kernels"] = ops.active_backend(cdt, device.type)
        xc, ec, wc, dc = (v.to(cdt) for v in (x, enc_x, w_hat, dec))  # what the op computes with
        x_hat, _ = ops._encode(xc, ec, t, t, Mt, Kt)
        prod = torch.bmm(x_hat, wc)
        with torch.no_grad():
            y = stl_apply(x, w_hat, enc_x, dec, t, N)
            if RANKS[rank] != "random":  # exact codec: STL must equal the dense product up to bf16 rounding
                ref = F.linear(x.float(), w.float())
                row["exact_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
        if mode == "forward":
            def dense():
                with torch.no_grad():
                    F.linear(x, w)

            def stl():
                with torch.no_grad():
                    stl_apply(x, w_hat, enc_x, dec, t, N)

            def core():
                torch.bmm(x_hat, wc)

            def encode():
                ops._encode(xc, ec, t, t, Mt, Kt)

            def decode():
                ops._decode(prod, dc, t, t, B, Mt, L, N)

            fns = {"dense": dense, "stl": stl, "core": core, "encode": encode, "decode": decode}
        else:
            gy = torch.randn(B, L, N, device=device, dtype=dtype)
            xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
            ps = [v.clone().requires_grad_() for v in (x, w_hat, enc_x, dec)]
            g_prod = torch.randn_like(prod)

            def dense():
                xd.grad = wd.grad = None
                F.linear(xd, wd).backward(gy)

            def stl():
                for v in ps:
                    v.grad = None
                stl_apply(*ps, t, N).backward(gy)

            def core():  # the three core GEMMs of forward + backward
                torch.bmm(x_hat, wc)
                torch.bmm(g_prod, wc.transpose(1, 2))
                torch.bmm(x_hat.transpose(1, 2), g_prod)

            fns = {"dense": dense, "stl": stl, "core": core}
        times = measure(fns, device, repeats, warmup, target_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [d / s for d, s in zip(times["dense"], times["stl"])]
    core_macs = rank * B * Mt * Kt * Nt
    row.update({f"{k}_ms": v * 1e3 for k, v in med.items()})
    row.update({
        "speedup": med["dense"] / med["stl"], "speedup_min": min(ratios), "speedup_max": max(ratios),
        "flop_bound": B * L * K * N / core_macs, "core_bound": med["dense"] / med["core"],
        "outside_core_share": max(0.0, 1.0 - med["core"] / med["stl"]), "repeats": repeats,
    })
    return row


def device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpret"] = triton_stl.interpreting()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "memory_gib": round(p.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version(),
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def markdown(result: dict) -> str:
    info, rows = result["device"], result["rows"]
    where = (f"{info['gpu']} (compute capability {info['capability']}, {info['sms']} SMs, {info['memory_gib']} GiB)"
             if info.get("gpu") else f"CPU ({info.get('cpu')}): **dry run at tiny sizes, timings meaningless**")
    lines = [
        "# STL vs dense F.linear on a GPU (bf16)",
        "",
        f"Regenerate: `{result['command']}` ({result['elapsed_s']:.0f} s)",
        "",
        f"- device: {where}",
        f"- torch {info['torch']}, CUDA {info['cuda']}, Triton {info['triton']}"
        + (" (interpreter)" if info.get("triton_interpret") else ""),
        "- STL t=4; r=24 (random codec) and r=49 (exact Strassen x Strassen, weight encoded from the dense one); "
        "kernels `triton` = fused gather+encode / decode+scatter Triton kernels with a cuBLAS `torch.bmm` core, "
        "`torch` = the pure-PyTorch path",
        "- speedup = dense ms / STL ms (medians of interleaved repeats; brackets: min-max of the same-repeat ratio); "
        "FLOP bound = dense MACs / STL core MACs; core bound = dense / core bmm(s) alone; outside core = 1 - core/STL",
        f"- goal ({GOAL['shape']}, r={GOAL['rank']}, {GOAL['mode']}, {GOAL['kernels']}): speedup >= {GOAL['speedup']}x: "
        f"**{result['goal']['verdict']}**",
        "",
        "| shape | M x K x N | r | mode | kernels | dense ms | STL ms | speedup | FLOP bound | core bound | outside core | encode / decode ms | exact rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | | {r['rank']} | {r['mode']} | {r['kernels']} | failed: {r['error']} |||||||||")
            continue
        ed = f"{r['encode_ms']:.3f} / {r['decode_ms']:.3f}" if "encode_ms" in r else "-"
        err = f"{r['exact_rel_err']:.1e}" if "exact_rel_err" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['M']}x{r['K']}x{r['N']} | {r['rank']} | {r['mode']} | {r['kernels']} | "
            f"{r['dense_ms']:.3f} | {r['stl_ms']:.3f} | **{r['speedup']:.2f}x** ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['flop_bound']:.2f} | {r['core_bound']:.2f} | {100 * r['outside_core_share']:.0f}% | {ed} | {err} |"
        )
    if result.get("skipped"):
        lines += ["", f"Not run (time budget): {', '.join(result['skipped'])}"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton in its interpreter); "
                    "writes to a temporary folder unless --out is given")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default results/bench, dry run: a temp dir)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    ap.add_argument("--ranks", default="24,49")
    ap.add_argument("--modes", default="forward,train")
    ap.add_argument("--kernels", default=None, help="comma-separated STL kernels: triton,torch (default: both where "
                    "Triton runs, else torch)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to check the code paths on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    shapes = DRY_SHAPES if a.dry_run else SHAPES
    names = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in names if s not in shapes]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {list(shapes)}")
    ranks = [int(r) for r in a.ranks.split(",")]
    if any(r not in RANKS for r in ranks):
        raise SystemExit(f"--ranks must be among {list(RANKS)}")
    modes = a.modes.split(",")
    kernels = a.kernels.split(",") if a.kernels else (["triton", "torch"] if triton_stl.available(device.type) else ["torch"])
    out = a.out or (Path(tempfile.mkdtemp(prefix="strassenkit-gpu-dry-")) if a.dry_run else Path("results/bench"))
    repeats = a.repeats or (1 if a.dry_run else 10)
    warmup, target_s = (0, 0.0) if a.dry_run else (3, 0.02)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # bf16 runs do not use it; recorded for completeness
    else:
        torch.manual_seed(0)
    dtype = torch.bfloat16
    rows, skipped = [], []
    jobs = [(n, r, m, k) for n in names for r in ranks for m in modes for k in kernels]
    for i, (name, rank, mode, kern) in enumerate(jobs):
        if time.perf_counter() - t_start > a.budget_s:
            skipped += [f"{n}/r{r}/{m}/{k}" for n, r, m, k in jobs[i:]]
            break
        try:
            row = bench_row(name, shapes[name], rank, mode, kern, dtype, device, repeats, warmup, target_s)
        except Exception as e:  # keep the other rows (e.g. out of memory), report the failure
            row = {"shape": name, "rank": rank, "mode": mode, "kernels": kern, "error": f"{type(e).__name__}: {e}"[:300]}
            if a.dry_run:
                raise
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    goal_rows = [r for r in rows if "error" not in r and (r["shape"], r["rank"], r["mode"], r["kernels"])
                 == (GOAL["shape"], GOAL["rank"], GOAL["mode"], GOAL["kernels"])]
    if not cuda:
        verdict = "not measured (dry run on the CPU)"
    elif not goal_rows:
        verdict = "not measured (row not run)"
    else:
        s = goal_rows[0]["speedup"]
        verdict = f"{'met' if s >= GOAL['speedup'] else 'not met'}: {s:.2f}x"
    command = "python benchmarks/gpu.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {"command": command.strip(), "device": device_info(device), "dry_run": a.dry_run, "rows": rows,
              "skipped": skipped, "goal": {**GOAL, "verdict": verdict}, "elapsed_s": time.perf_counter() - t_start}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu.md").write_text(markdown(result))
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
