"""Where STL forward time goes for one shape: encode, core bmm, decode vs dense F.linear.

    python benchmarks/stages.py 4096 4096 4096 --threads 2 [--retain-memory] [--dtype bfloat16] [--kernels torch]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from strassenkit.functional import ops
from strassenkit.functional.stl import stl_apply
from strassenkit.runtime import retain_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("M", type=int)
    ap.add_argument("K", type=int)
    ap.add_argument("N", type=int)
    ap.add_argument("--tile", type=int, default=4)
    ap.add_argument("--rank", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernels", default="auto", choices=["auto", "native", "torch"],
                    help="the fast path's kernels (strassenkit.functional.ops.backend); dense is F.linear either way")
    ap.add_argument("--retain-memory", action="store_true",
                    help="keep freed memory in the process (strassenkit.runtime.retain_freed_memory)")
    a = ap.parse_args()
    with ops.backend(a.kernels):
        run(a)


def run(a) -> None:
    torch.set_num_threads(a.threads)
    if a.retain_memory:
        retain_freed_memory()
    dt = getattr(torch, a.dtype)
    t, r = a.tile, a.rank
    L = 64 if a.M % 64 == 0 else a.M
    B = a.M // L
    Kt, Nt, Mt = -(-a.K // t), -(-a.N // t), -(-L // t)
    x = torch.randn(B, L, a.K).to(dt)
    w = torch.randn(a.N, a.K).to(dt)
    w_hat, enc_x, dec = torch.randn(r, Kt, Nt).to(dt), torch.randn(r, t * t).to(dt), torch.randn(t * t, r).to(dt)
    cdt = ops.compute_dtype(dt, "cpu")
    xc, ec, dc, wc = x.to(cdt), enc_x.to(cdt), dec.to(cdt), w_hat.to(cdt)
    x_hat, _ = ops._encode(xc, ec, t, t, Mt, Kt)
    prod = ops.bmm(x_hat, wc)
    stages = {
        "dense F.linear": lambda: F.linear(x, w),
        "STL forward (all)": lambda: stl_apply(x, w_hat, enc_x, dec, t, a.N),
        "  encode": lambda: ops._encode(xc, ec, t, t, Mt, Kt),
        "  core bmm": lambda: ops.bmm(x_hat, wc),
        "  decode": lambda: ops._decode(prod, dc, t, t, B, Mt, L, a.N),
    }
    times = {k: [] for k in stages}
    with torch.no_grad():
        for f in stages.values():
            f()
        for _ in range(a.repeats):
            for k, f in stages.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense F.linear"])
    print(f"M={a.M} K={a.K} N={a.N} t={t} r={r} {a.dtype} (compute {cdt}) threads={a.threads} kernels={ops.kernels_label(cdt)} "
          f"malloc={'retain' if a.retain_memory else 'default'}")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:20s} {med * 1e3:9.2f} ms   dense/this = {dense / med:5.2f}")


if __name__ == "__main__":
    main()
