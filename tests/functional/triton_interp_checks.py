"""Correctness checks of the Triton STL kernels in Triton's CPU interpreter (run as a script).

``tests/functional/test_triton_stl.py`` runs this file in a subprocess with ``TRITON_INTERPRET=1``
(it must be set before Triton is imported, and the test process may already have imported it) and
reads one JSON object from stdout: {check name: {"err": relative error, "tol": tolerance, "calls":
Triton kernel launches, ...}}. Every result is compared with the float64 pure-PyTorch reference.
Shapes are tiny: the interpreter takes milliseconds per program instance.
"""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import strassenkit as sk  # noqa: E402
from strassenkit.functional import ops, stl_apply, stl_apply_reference, triton_stl  # noqa: E402

IMPORTED_TRITON_AT_IMPORT = "triton" in sys.modules  # importing strassenkit must not import Triton
torch.manual_seed(0)
torch.set_num_threads(1)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SENTINEL = 12345.0
results = {}
calls = {"n": 0}
for _name in ("encode", "decode", "tiles_wgrad"):
    _f = getattr(triton_stl, _name)

    def _counted(*a, _f=_f, **k):
        calls["n"] += 1
        return _f(*a, **k)

    setattr(triton_stl, _name, _counted)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def record(name, err, dtype, **extra):
    results[name] = {"err": err, "tol": TOL[dtype], "calls": calls["n"], **extra}
    calls["n"] = 0


def ref_stages(x, enc, dec_, P, G, n, m, p, Mt, Kt, B, M, N):
    with ops.backend("torch"):
        xh, _ = ops._encode(x.double(), enc.double(), n, m, Mt, Kt)
        y = ops._decode(P.double(), dec_.double(), n, p, B, Mt, M, N)
        wg = ops._tiles_wgrad(x.double(), G.double(), n, m, Mt, Kt)
    return xh, y, wg


# ------------------------------------------------------------ the three kernels, one by one
CASES = [  # (name, B, M, K, N, (n, m, p), r)
    ("t4_r24", 2, 9, 21, 13, (4, 4, 4), 24),      # ragged tiles in every direction, partial last block
    ("t4_r49", 1, 8, 16, 12, (4, 4, 4), 49),      # exact Strassen x Strassen rank (R_PAD 64)
    ("row1_r10", 3, 5, 10, 7, (1, 4, 4), 10),     # row_tile=1: 4-element tiles padded to 16
    ("fmt234_r7", 2, 5, 7, 9, (2, 3, 4), 7),      # non-square format
]
for name, B, M, K, N, (n, m, p), r in CASES:
    Mt, Kt, Nt = -(-M // n), -(-K // m), -(-N // p)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dn = str(dtype).split(".")[1]
        x = torch.randn(B, K, M).to(dtype).transpose(1, 2)  # a non-contiguous input
        enc = torch.randn(r, n * m).to(dtype)
        dec_ = torch.randn(r, n * p).to(dtype).t()  # a transposed (non-contiguous) decoder
        P = torch.randn(r, B * Mt, Nt).to(dtype)
        G = torch.randn(r, B * Mt, Kt).to(dtype)
        xh_ref, y_ref, wg_ref = ref_stages(x, enc, dec_, P, G, n, m, p, Mt, Kt, B, M, N)
        # encode into a view of a larger buffer: nothing may be written past its r*T entries
        T = B * Mt * Kt
        big = torch.full((r * T + 64,), SENTINEL, dtype=dtype)
        xh = triton_stl.encode(x, enc, n, m, Mt, Kt, out=big[: r * T].view(r, B * Mt, Kt))
        record(f"encode/{name}/{dn}", rel(xh, xh_ref), dtype, dtype_ok=xh.dtype == dtype,
               guard_ok=bool((big[r * T:] == SENTINEL).all()))
        # decode into a strided window of a padded buffer: rows >= M and columns >= N must stay untouched
        ybig = torch.full((B, M + 5, N + 6), SENTINEL, dtype=dtype)
        y = triton_stl.decode(P, dec_, n, p, B, Mt, M, N, out=ybig[:, 2:2 + M, 3:3 + N])
        outside = ybig.clone()
        outside[:, 2:2 + M, 3:3 + N] = SENTINEL
        record(f"decode/{name}/{dn}", rel(y, y_ref), dtype, dtype_ok=y.dtype == dtype,
               guard_ok=bool((outside == SENTINEL).all()))
        wg = triton_stl.tiles_wgrad(x, G, n, m, Mt, Kt, block_t=16)
        record(f"wgrad/{name}/{dn}", rel(wg, wg_ref), dtype, dtype_ok=wg.dtype == dtype, guard_ok=True)

# the gradient kernel with more tile blocks than programs (the grid-stride loop)
old = triton_stl._MAX_WGRAD_PROGRAMS
triton_stl._MAX_WGRAD_PROGRAMS = 3
B, M, K, n, m, r = 2, 13, 30, 4, 4, 24
Mt, Kt = -(-M // n), -(-K // m)
x, G = torch.randn(B, M, K), torch.randn(r, B * Mt, Kt)
with ops.backend("torch"):
    wg_ref = ops._tiles_wgrad(x.double(), G.double(), n, m, Mt, Kt)
record("wgrad/grid_stride/float32", rel(triton_stl.tiles_wgrad(x, G, n, m, Mt, Kt, block_t=16), wg_ref),
       torch.float32, dtype_ok=True, guard_ok=True)
triton_stl._MAX_WGRAD_PROGRAMS = old

# ------------------------------------------------------------ the whole op: forward + backward through autograd
for fmt, r, dtype in (((4, 4, 4), 24, torch.float32), ((4, 4, 4), 24, torch.float16), ((1, 4, 4), 6, torch.float32)):
    n, m, p = fmt
    lead, M, K, N = (2,), 7, 10, 9
    base = [torch.randn(*lead, M, K), torch.randn(r, -(-K // m), -(-N // p)), torch.randn(r, n * m), torch.randn(n * p, r)]
    base = [t.to(dtype) for t in base]
    gy = torch.randn(*lead, M, N).to(dtype)
    ops64 = [t.double().requires_grad_(True) for t in base]
    y64 = stl_apply_reference(*ops64, fmt, N)
    g64 = torch.autograd.grad(y64, ops64, gy.double())
    opsT = [t.clone().requires_grad_(True) for t in base]
    with ops.backend("triton"):
        yT = stl_apply(*opsT, fmt, N)
        gT = torch.autograd.grad(yT, opsT, gy)
    errs = [rel(yT, y64)] + [rel(a, b) for a, b in zip(gT, g64)]
    dn = str(dtype).split(".")[1]
    record(f"op/{n}{m}{p}_r{r}/{dn}", max(errs), dtype, dtype_ok=all(t.dtype == dtype for t in (yT, *gT)),
           guard_ok=True, errs=errs)

# STLinear with an exact algorithm: equals the dense layer through the Triton path
lin = torch.nn.Linear(24, 20)
layer = sk.STLinear.from_linear(lin, "strassen_x_strassen")
x = torch.randn(2, 6, 24)
with ops.backend("triton"):
    y = layer(x)
record("stlinear/exact_r49/float32", rel(y, lin(x.double().float()).double()), torch.float32, dtype_ok=True, guard_ok=True)
with ops.backend("triton"):
    kind = ops.active_backend(torch.float32, "cpu"), ops.active_backend(torch.float64, "cpu")
results["active_backend"] = {"float32": kind[0], "float64": kind[1]}

results["import"] = {"triton_imported_by_strassenkit": IMPORTED_TRITON_AT_IMPORT}

json.dump(results, sys.stdout)
