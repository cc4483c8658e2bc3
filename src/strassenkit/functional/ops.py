"""The STL fast path as a ``torch.library`` custom op with a fake (meta) kernel and a custom backward.

``torch.ops.strassenkit.stl_forward(x, w_hat, enc_x, dec, n, m, p, out_features)`` with

    x:      (B, M, K)          B independent matrices (callers flatten leading dims)
    w_hat:  (r, Kt, Nt)        encoded weight, Kt = ceil(K/m), Nt = ceil(N/p)
    enc_x:  (r, n*m)           activation encoder
    dec:    (n*p, r)           decoder

returns ``(y, x_hat, prod)``: y (B, M, out_features) in x's dtype, and the two intermediates the
backward needs, x_hat (r, B*Mt, Kt) and prod (r, B*Mt, Nt) in the compute dtype (Mt = ceil(M/n)).
Only ``y`` is meant for users (:func:`strassenkit.functional.stl.stl_apply` drops the others);
gradients that reach x_hat or prod are ignored.

Kernels: CUDA tensors (float32/float16/bfloat16) use the Triton kernels of :mod:`.triton_stl` for the two
memory-bound stages (tile gather + encode in one kernel, decode + tile scatter in one kernel, and the
encoder/decoder gradients) when Triton imports; the core stays ``torch.bmm`` (cuBLAS).
float32/float64 on CPU use the native C++ kernels of ``csrc/stl_kernels.cpp`` (see
:mod:`.native`: compiled once per machine; tile gather + encode and decode + tile scatter fused in one
pass over cache-sized column chunks, threads take slices of chunks from a shared queue; the r core GEMMs likewise, each
single-threaded). bfloat16 on CPU (where it is the compute dtype) uses the native bf16 encode/decode (bf16 in
and out, float32 arithmetic) around a bf16 ``torch.bmm``. Everything else, or ``backend("torch")``, or
``STRASSENKIT_NATIVE=0``, uses the
pure-PyTorch helpers below; both compute the same values (tests compare them).

Layout (the "bmm layout"): every stage is one dense BLAS call on a contiguous 2-D/3-D view.

    encode:  tiles (n*m, B*Mt*Kt) = one permute-copy of x;  x_hat = enc_x @ tiles
    core:    prod = bmm(x_hat, w_hat)
    decode:  (n*p, B*Mt*Nt) = dec @ prod;  one permute-copy into (B, M, N)

Backward (g = grad of y, in tiles gt (n*p, B*Mt*Nt)):

    g_prod = dec^T @ gt                 grad_dec   = gt @ prod^T
    g_xhat = bmm(g_prod, w_hat^T)       grad_w_hat = bmm(x_hat^T, g_prod)
    grad_x = untile(enc_x^T @ g_xhat)   grad_enc_x = g_xhat @ tiles(x)^T

Saved for backward: x, w_hat, enc_x, dec (the inputs) and x_hat, prod. The permuted copy of x is
not kept (it is rebuilt only if grad_enc_x is needed), unlike plain autograd through the same ops.

Compute dtype: float32/float64 compute in their own dtype. bfloat16/float16 compute in float32 on
CPUs without native bf16 matrix support (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False:
there, e.g. on AVX2-only machines, a bf16 GEMM is ~30x slower than fp32), else in their own dtype;
the output is rounded to x's dtype either way. See :func:`compute_dtype`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from .._utils import ceil_div, pad_last2
from . import native, triton_stl

__all__ = ["stl_forward", "bmm", "compute_dtype", "native_low_precision", "backend", "active_backend", "kernels_label"]


@functools.lru_cache(maxsize=None)
def native_low_precision(device_type: str) -> bool:
    """True if bf16/fp16 GEMMs run natively (fast) on this device type; CPU asks oneDNN."""
    if device_type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without mkldnn
        return False


def compute_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the fast path computes in for inputs of ``dtype`` on ``device_type``."""
    if dtype in (torch.bfloat16, torch.float16) and not native_low_precision(device_type):
        return torch.float32
    return dtype


# --------------------------------------------------------------------------- backends
# "native": the C++ kernels of csrc/stl_kernels.cpp (float32/float64 on CPU; compiled once per
# machine, see .native). "triton": the Triton kernels of .triton_stl (encode/decode of CUDA tensors
# in float32/float16/bfloat16; also CPU tensors in Triton's interpreter, TRITON_INTERPRET=1).
# "torch": the pure-PyTorch helpers below (the reference). "auto" (default) takes native on CPU and
# triton on CUDA where they apply, torch elsewhere. All compute the same values; tests compare them.
_BACKENDS = ("auto", "native", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_backend = "auto"


@contextlib.contextmanager
def backend(name: str):
    """Context manager selecting the fast path's kernels: "auto", "native", "triton" or "torch".

    "triton" uses the Triton kernels wherever they can run (CUDA tensors; CPU tensors only in the
    interpreter) and the pure-PyTorch path elsewhere (e.g. float64)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "native" and not native.available():
        raise RuntimeError("backend('native'): the native kernels could not be built or were disabled (STRASSENKIT_NATIVE=0)")
    if name == "triton" and not triton_stl.available("cuda"):
        raise RuntimeError("backend('triton'): Triton is not installed (or STRASSENKIT_TRITON=0), or there is neither a "
                           "CUDA device nor TRITON_INTERPRET=1")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def active_backend(dtype: torch.dtype = torch.float32, device_type: str = "cpu") -> str:
    """Which kernels the fast path uses for tensors of (compute) ``dtype`` on ``device_type``."""
    if _backend == "torch":
        return "torch"
    if (_backend == "triton" or (_backend == "auto" and device_type == "cuda")) and dtype in _TRITON_DTYPES:
        if triton_stl.available(device_type):
            return "triton"
    if _backend == "triton" or device_type != "cpu" or dtype not in (torch.float32, torch.float64):
        return "torch"
    return "native" if native.available() else "torch"


def kernels_label(dtype: torch.dtype = torch.float32, device_type: str = "cpu") -> str:
    """What runs the fast path for (compute) ``dtype`` on ``device_type``, for reports: :func:`active_backend`,
    or "native bf16 encode/decode + torch bmm" where bf16 computes with the native bf16 encode/decode."""
    name = active_backend(dtype, device_type)
    if (dtype == torch.bfloat16 and device_type == "cpu" and name == "torch" and _backend in ("auto", "native")
            and native.available()):
        return "native bf16 encode/decode + torch bmm"
    return name


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; t itself when it already is (``Tensor.to`` costs a few microseconds even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def _native_for(t: Tensor) -> bool:
    return active_backend(t.dtype, t.device.type) == "native"


def _native_bf16_for(t: Tensor) -> bool:
    """True if the native bf16 encode/decode (bf16 in and out, float32 arithmetic) run for ``t``: a plain
    bfloat16 CPU tensor (the fast path computes in bf16 only where the CPU's bf16 GEMMs are native), the
    native kernels built, backend "auto" or "native"."""
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or _backend in ("torch", "triton"):
        return False
    if isinstance(t, torch._subclasses.FakeTensor) or t.is_meta:
        return False
    return native.available()


def _triton_for(t: Tensor) -> bool:
    if isinstance(t, torch._subclasses.FakeTensor) or t.is_meta:  # tracing: no kernel launches
        return False
    return active_backend(t.dtype, t.device.type) == "triton"


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul; natively the r GEMMs are split across threads, each GEMM single-threaded, and the
    output comes from the native kernels' memory pool (see csrc: no page faults on repeated calls)."""
    if _native_for(a):
        return torch.ops.strassenkit_native.bmm(a, b)
    return torch.bmm(a, b)


# --------------------------------------------------------------------------- fused native path
# The native kernels also have a fused path (csrc "fused path"): per block of tile rows, gather +
# encode, the r core GEMMs (a register-blocked kernel) and decode + scatter run back to back while the
# block stays in cache; its backward likewise. It wins where the encoded weight is small enough that
# streaming it once per block costs less than writing and re-reading x_hat and the products. Measured on
# the 2-core AVX2 EPYC (same-process A/B, see results/bench/README.md): the forward up to Kt*Nt = 192*192
# per rank (d=384 MLP, 768x768 projections), the backward up to 64*256 (d <= 256 MLPs); beyond that the
# unfused stages with BLAS core GEMMs are faster. "on"/"off" force it (A/B timing, tests);
# STRASSENKIT_FUSED=auto|on|off sets the start value.
_FUSED_MODES = ("auto", "on", "off")
_fused = os.environ.get("STRASSENKIT_FUSED", "auto").strip().lower()
_fused = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(_fused, _fused)
if _fused not in _FUSED_MODES:  # pragma: no cover - a typo in the environment
    _fused = "auto"
_FUSED_MAX_TILES = {"forward": 192 * 192, "backward": 64 * 256}  # Kt * Nt per rank


@contextlib.contextmanager
def fused(mode: str):
    """Context manager forcing the native fused path "on", "off", or back to "auto"."""
    global _fused
    if mode not in _FUSED_MODES:
        raise ValueError(f"fused mode must be one of {_FUSED_MODES}, got {mode!r}")
    old, _fused = _fused, mode
    try:
        yield
    finally:
        _fused = old


def _use_fused(x: Tensor, w_hat: Tensor, stage: str = "forward") -> bool:
    """True if the native fused kernels run this layer's ``stage`` (native backend; size rule under "auto")."""
    if _fused == "off" or not _native_for(x):
        return False
    return _fused == "on" or w_hat.shape[1] * w_hat.shape[2] <= _FUSED_MAX_TILES[stage]


# --------------------------------------------------------------------------- layout helpers
# Encode/decode are skinny GEMMs (inner dimension n*m or r) over millions of columns: BLAS runs them
# far below peak and the permute-copies that bring tiles into the bmm layout are strided gathers.
# Both are done in row blocks of the bmm layout sized to stay in cache (_CHUNK_COLS columns): the
# tile copy of a block is consumed by the GEMM while hot, and decode scatters each block into the
# final (B, M, N) layout while hot. Measured on a 2-core AVX2 EPYC: ~25-40 % less time for these
# passes than one whole-tensor permute-copy + one GEMM, with one thread (see _blocks for more).
_CHUNK_COLS = 8192


def _blocks(rows: int, cols_per_row: int, device_type: str = "cpu"):
    # A CPU cache heuristic: blocks only on the CPU and only with one intra-op thread. On a GPU every
    # block would be one more kernel launch (an (8, 512, 1024) encode would be 32 mm launches) for no
    # cache gain; with several CPU threads every small op is a parallel region whose barrier costs far
    # more than the cache gain (measured: 10-30x slower on a loaded 2-core VM). Both take the whole
    # tensor as one block (few large ops).
    if device_type != "cpu" or torch.get_num_threads() > 1:
        yield 0, rows
        return
    step = max(1, _CHUNK_COLS // max(1, cols_per_row))
    for s in range(0, rows, step):
        yield s, min(rows, s + step)


def _tile_block(x5: Tensor, s: int, e: int) -> Tensor:
    """x5 (BMt, n, Kt, m) rows s:e -> tiles (n*m, (e-s)*Kt) (a small copy)."""
    _, n, Kt, m = x5.shape
    return x5[s:e].permute(1, 3, 0, 2).reshape(n * m, (e - s) * Kt)


def _encode(x: Tensor, enc: Tensor, n: int, m: int, Mt: int, Kt: int, wgrad_of: Tensor | None = None):
    """x (B, M, K) -> enc-encoded (r, B*Mt, Kt), enc (r, n*m); zero padding to tile multiples.

    With ``wgrad_of`` = G (r, B*Mt, Kt) also returns sum over tiles of G x tiles^T (r, n*m), the
    gradient of the encoder, computed from the same cache-hot tile blocks.
    """
    if _triton_for(x):
        out = triton_stl.encode(x, enc, n, m, Mt, Kt)
        return out, (triton_stl.tiles_wgrad(x, wgrad_of, n, m, Mt, Kt) if wgrad_of is not None else None)
    if _native_bf16_for(x) and (wgrad_of is None or wgrad_of.dtype == torch.bfloat16):
        G = wgrad_of.contiguous() if wgrad_of is not None else x.new_empty(0)
        out, genc = torch.ops.strassenkit_native.encode_bf16(x, enc.float(), n, m, Mt, Kt, True, G)
        return out, (genc.to(x.dtype) if wgrad_of is not None else None)
    if _native_for(x):
        G = wgrad_of.contiguous() if wgrad_of is not None else x.new_empty(0)
        out, genc = torch.ops.strassenkit_native.encode(x, enc, n, m, Mt, Kt, True, G)
        return out, (genc if wgrad_of is not None else None)
    B = x.shape[0]
    r = enc.shape[0]
    x5 = pad_last2(x, Mt * n, Kt * m).reshape(B * Mt, n, Kt, m)
    out = x.new_empty((r, B * Mt, Kt))
    genc = x.new_zeros((r, n * m)) if wgrad_of is not None else None
    enc = enc.t().contiguous().t()  # column-major encoder: measurably faster skinny GEMM in MKL
    for s, e in _blocks(B * Mt, Kt, x.device.type):
        t = _tile_block(x5, s, e)
        torch.mm(enc, t, out=out[:, s:e].view(r, (e - s) * Kt))  # strided out: BLAS writes in place (ldc)
        if genc is not None:
            genc.addmm_(wgrad_of[:, s:e].reshape(r, (e - s) * Kt), t.t())
    return out, genc


def _tiles_wgrad(x: Tensor, g: Tensor, n: int, m: int, Mt: int, Kt: int) -> Tensor:
    """sum over tiles of g (r, B*Mt, Kt) x tiles(x)^T -> (r, n*m) without materializing all tiles."""
    if _triton_for(x):
        return triton_stl.tiles_wgrad(x, g, n, m, Mt, Kt)
    if _native_for(x):
        unused_enc = g.new_empty((g.shape[0], n * m))  # want_out=False: only its shape is checked
        return torch.ops.strassenkit_native.encode(x, unused_enc, n, m, Mt, Kt, False, g.contiguous())[1]
    if _native_bf16_for(x) and g.dtype == torch.bfloat16:
        unused_enc = torch.empty((g.shape[0], n * m))  # float32; only its shape is checked
        return torch.ops.strassenkit_native.encode_bf16(x, unused_enc, n, m, Mt, Kt, False, g.contiguous())[1].to(x.dtype)
    B = x.shape[0]
    r = g.shape[0]
    x5 = pad_last2(x, Mt * n, Kt * m).reshape(B * Mt, n, Kt, m)
    out = x.new_zeros((r, n * m))
    for s, e in _blocks(B * Mt, Kt, x.device.type):
        out.addmm_(g[:, s:e].reshape(r, (e - s) * Kt), _tile_block(x5, s, e).t())
    return out


def _decode(P: Tensor, dec: Tensor, n: int, p: int, B: int, Mt: int, M: int, N: int, bias: Tensor | None = None) -> Tensor:
    """P (r, B*Mt, Nt) -> (B, M, N): y[b, a*n+i, c*p+k] = sum_l dec[i*p+k, l] P[l, b*Mt+a, c] (+ bias[c*p+k]).

    ``bias`` (N,) in P's dtype: the native kernels add it to each cache-hot chunk before scattering it (the
    same values as ``y.add_(bias)`` afterwards, without one more pass over y); elsewhere it is added after."""
    if _native_for(P):
        return torch.ops.strassenkit_native.decode(P, dec, n, p, B, Mt, M, N, bias)
    if _native_bf16_for(P):  # y rounded to bf16, then + bias in bf16: the values of every other path (op + add_)
        y = torch.ops.strassenkit_native.decode_bf16(P, dec.float(), n, p, B, Mt, M, N, None)
        return y if bias is None else y.add_(bias)
    if bias is not None:
        return _decode(P, dec, n, p, B, Mt, M, N).add_(bias)
    if _triton_for(P):
        return triton_stl.decode(P, dec, n, p, B, Mt, M, N)
    r, BMt, Nt = P.shape
    y = P.new_empty((B, Mt * n, Nt * p))  # returned itself (not a view of it): callers may modify it in place
    y4 = y.view(B * Mt, n, Nt, p)
    for s, e in _blocks(BMt, Nt, P.device.type):
        blk = dec @ P[:, s:e].reshape(r, (e - s) * Nt)  # (n*p, (e-s)*Nt)
        y4[s:e].copy_(blk.view(n, p, e - s, Nt).permute(2, 0, 3, 1))
    if Mt * n != M or Nt * p != N:
        y = y[:, :M, :N].contiguous()
    return y


def _forward_impl(x, w_hat, enc_x, dec, n, m, p, out_features, bias=None):
    """(y, x_hat, prod); with ``bias`` (only where the compute dtype is x's dtype, see EagerSTL) y includes it,
    added by the native kernels while they write y (the same values as ``y.add_(bias)`` afterwards)."""
    B, M, K = x.shape
    r, Kt, Nt = w_hat.shape
    Mt = ceil_div(M, n)
    cdt = compute_dtype(x.dtype, x.device.type)
    xc = _as(x, cdt)
    if _use_fused(xc, w_hat):
        y, x_hat, prod = torch.ops.strassenkit_native.fused_forward(xc, _as(w_hat, cdt), _as(enc_x, cdt), _as(dec, cdt),
                                                                    n, m, p, out_features, True, bias)
        return _as(y, x.dtype), x_hat, prod
    x_hat, _ = _encode(x.to(cdt), enc_x.to(cdt), n, m, Mt, Kt)
    prod = bmm(x_hat, w_hat.to(cdt))
    y = _decode(prod, dec.to(cdt), n, p, B, Mt, M, out_features, bias)
    return y.to(x.dtype), x_hat, prod


_PLAIN = (Tensor, torch.nn.Parameter)


def plain_eager(x: Tensor, *operands: Tensor) -> bool:
    """True where the eager shortcuts below may replace the custom op: plain CPU tensors, nothing watching.

    That is: x and the operands are plain ``torch.Tensor``/``nn.Parameter`` on the CPU (no subclass, fake or
    meta tensor), and no torch.compile tracing, dispatch mode (FlopCounterMode, fake modes), torch-function
    mode (``with torch.device(...)``) or functorch transform (vmap, grad) is active: then nothing can tell
    the custom op from the same functions called directly.
    """
    if type(x) not in _PLAIN or x.device.type != "cpu" or any(type(t) not in _PLAIN for t in operands):
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling())


def stl_infer(x: Tensor, w_hat: Tensor, enc_x: Tensor, dec: Tensor, n: int, m: int, p: int, out_features: int,
              bias: Tensor | None = None) -> Tensor:
    """y (+ bias) of :func:`stl_forward` without the op's dispatch and without the saved intermediates.

    The same kernels compute the same y bit for bit (tests compare them); only x_hat and prod, which
    nothing needs without a backward, are not written, and the fused kernels add the bias while they
    write y. For eager inference (no gradient needed, :func:`plain_eager`).
    """
    cdt = compute_dtype(x.dtype, x.device.type)
    xc = _as(x, cdt)
    in_kernel = bias is not None and cdt == x.dtype  # y + bias rounded once, as y.add_(bias) would
    if _use_fused(xc, w_hat):
        y = torch.ops.strassenkit_native.fused_forward(xc, _as(w_hat, cdt), _as(enc_x, cdt), _as(dec, cdt), n, m, p,
                                                       out_features, False, _as(bias, cdt) if in_kernel else None)[0]
        if in_kernel or bias is None:
            return _as(y, x.dtype)
    elif in_kernel and _native_for(xc):  # the unfused stages, bias added by the decode kernel
        B, M, _K = x.shape
        Kt = w_hat.shape[1]
        Mt = ceil_div(M, n)
        x_hat, _ = _encode(xc, _as(enc_x, cdt), n, m, Mt, Kt)
        return _decode(bmm(x_hat, _as(w_hat, cdt)), _as(dec, cdt), n, p, B, Mt, M, out_features, _as(bias, cdt))
    else:
        y = _forward_impl(x, w_hat, enc_x, dec, n, m, p, out_features)[0]
    y = _as(y, x.dtype)
    return y if bias is None else y.add_(_as(bias, y.dtype))


class EagerSTL(torch.autograd.Function):
    """The custom op's forward and backward (the same functions) as a plain autograd.Function.

    In eager mode the custom op's dispatch costs ~50-100 us per call on our CPUs, as much as the whole
    layer for small inputs; this runs the same code with autograd.Function's lighter bookkeeping. Used by
    stl_apply only where :func:`plain_eager` holds; torch.compile/export, fake tensors and dispatch modes
    always see the custom op.

    With ``bias`` (N,) (in x's dtype, which must then be the compute dtype) y includes it: the kernels add it
    while they write y, and the backward returns its gradient (the sum of grad_y over rows). One autograd node
    per layer instead of three (the op, the bias add and the reshape), and one pass over y less.
    """

    @staticmethod
    def forward(ctx, x, w_hat, enc_x, dec, n, m, p, out_features, bias):  # bias: a tensor or None, always passed
        y, x_hat, prod = _forward_impl(x, w_hat, enc_x, dec, n, m, p, out_features, bias)
        ctx.save_for_backward(x, w_hat, enc_x, dec, x_hat, prod)
        ctx.fmt = (n, m, p)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grads = _backward(ctx, grad_y, None, None)
        gb = grad_y.sum((0, 1)) if ctx.has_bias and grad_y is not None and ctx.needs_input_grad[8] else None
        return (*grads, gb)


def stl_train_eager(x: Tensor, w_hat: Tensor, enc_x: Tensor, dec: Tensor, n: int, m: int, p: int, out_features: int,
                    bias: Tensor | None = None) -> Tensor:
    """y (+ bias) with autograd, for eager training where :func:`plain_eager` holds and x's dtype is the compute dtype.

    Where the native size rules choose the fused kernels for both the forward and the backward (small layers, where
    per-call cost matters most), one C++ autograd node (``strassenkit_native::fused_train``: the same kernels and
    values as :class:`EagerSTL`, bit for bit) replaces the Python autograd.Function; elsewhere :class:`EagerSTL`.
    """
    if _use_fused(x, w_hat, "forward") and _use_fused(x, w_hat, "backward") and _has_fused_train():
        return torch.ops.strassenkit_native.fused_train(x, w_hat, enc_x, dec, bias, n, m, p, out_features)
    return EagerSTL.apply(x, w_hat, enc_x, dec, n, m, p, out_features, bias)


def _has_fused_train() -> bool:  # a kernel build from before fused_train existed has no such op
    ok = _FUSED_TRAIN.get("ok")
    if ok is None:
        ok = _FUSED_TRAIN["ok"] = hasattr(torch.ops.strassenkit_native, "fused_train")
    return ok


_FUSED_TRAIN: dict = {}


def eager_bias_ok(x: Tensor, bias: Tensor | None) -> bool:
    """True if :class:`EagerSTL` may take ``bias`` itself: x and bias in one dtype that the fast path computes in."""
    return bias is not None and bias.dtype == x.dtype and compute_dtype(x.dtype, x.device.type) == x.dtype


def stl_forward_plain(x, w_hat, enc_x, dec, n: int, m: int, p: int, out_features: int) -> Tensor:
    """Same layout with plain differentiable ops (one permute-copy, mm, bmm, mm, permute-copy).

    Used instead of the custom op while ``torch.utils.flop_counter.FlopCounterMode`` is active: the
    counter cannot see inside a custom op, and with plain ops it attributes the core to ``bmm`` and
    encode/decode to ``mm``. Returns y (B, M, out_features) in x's dtype.
    """
    B, M, K = x.shape
    r, Kt, Nt = w_hat.shape
    Mt = ceil_div(M, n)
    cdt = compute_dtype(x.dtype, x.device.type)
    xt = pad_last2(x.to(cdt), Mt * n, Kt * m).reshape(B, Mt, n, Kt, m).permute(2, 4, 0, 1, 3).reshape(n * m, -1)
    x_hat = (enc_x.to(cdt) @ xt).view(r, B * Mt, Kt)
    prod = torch.bmm(x_hat, w_hat.to(cdt))
    yt = dec.to(cdt) @ prod.view(r, B * Mt * Nt)
    y = yt.view(n, p, B, Mt, Nt).permute(2, 3, 0, 4, 1).reshape(B, Mt * n, Nt * p)
    return y[:, :M, :out_features].to(x.dtype)


def flop_counting_active() -> bool:
    """True inside ``FlopCounterMode`` (outside torch.compile tracing)."""
    if torch.compiler.is_compiling():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(type(mode).__name__ == "_FlopCounterMode" for mode in _get_current_dispatch_mode_stack())


@torch.library.custom_op("strassenkit::stl_forward", mutates_args=())
def stl_forward(
    x: Tensor, w_hat: Tensor, enc_x: Tensor, dec: Tensor, n: int, m: int, p: int, out_features: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Fast STL forward (shapes in the module docstring). Returns (y, x_hat, prod)."""
    return _forward_impl(x, w_hat, enc_x, dec, n, m, p, out_features)


@stl_forward.register_fake
def _(x, w_hat, enc_x, dec, n, m, p, out_features):
    B, M, _K = x.shape
    r, Kt, Nt = w_hat.shape
    Mt = -(-M // n)
    cdt = compute_dtype(x.dtype, x.device.type)
    y = x.new_empty((B, M, out_features))
    x_hat = x.new_empty((r, B * Mt, Kt), dtype=cdt)
    prod = x.new_empty((r, B * Mt, Nt), dtype=cdt)
    return y, x_hat, prod


def _setup_context(ctx, inputs, output):
    x, w_hat, enc_x, dec, n, m, p, out_features = inputs
    _y, x_hat, prod = output
    ctx.save_for_backward(x, w_hat, enc_x, dec, x_hat, prod)
    ctx.fmt = (n, m, p)
    ctx.mark_non_differentiable(x_hat, prod)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused x_hat/prod outputs


def _backward(ctx, grad_y, _grad_xhat, _grad_prod):
    x, w_hat, enc_x, dec, x_hat, prod = ctx.saved_tensors
    n, m, p = ctx.fmt
    if grad_y is None:
        return None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not itself differentiable
        raise NotImplementedError(
            "double backward (create_graph=True) through the STL fast path is not supported; "
            "use strassenkit.functional.stl_apply_reference for higher-order gradients"
        )
    need_x, need_w, need_e, need_d = ctx.needs_input_grad[:4]
    B, M, K = x.shape
    r, Kt, Nt = w_hat.shape
    Mt = ceil_div(M, n)
    cdt = x_hat.dtype
    gx = gw = ge = gd = None
    if _use_fused(x_hat, w_hat, "backward"):  # x_hat/prod mean the same on both paths: any pairing is right
        gx, gw, ge, gd = torch.ops.strassenkit_native.fused_backward(
            _as(grad_y, cdt), _as(x, cdt), _as(w_hat, cdt), _as(enc_x, cdt), _as(dec, cdt), x_hat, prod, n, m, p,
            need_x, need_w, need_e, need_d)
        return ((_as(gx, x.dtype) if need_x else None), (_as(gw, w_hat.dtype) if need_w else None),
                (_as(ge, enc_x.dtype) if need_e else None), (_as(gd, dec.dtype) if need_d else None),
                None, None, None, None)
    # g_prod = dec^T-encode of grad_y; grad_dec = sum over tiles of prod x tiles(grad_y)^T, transposed
    g_prod, gdT = _encode(grad_y.to(cdt), dec.to(cdt).t(), n, p, Mt, Nt, wgrad_of=prod if need_d else None)
    if need_d:
        gd = gdT.t().to(dec.dtype)
    if need_w:
        gw = bmm(x_hat.transpose(1, 2), g_prod).to(w_hat.dtype)
    if need_x or need_e:
        g_xhat = bmm(g_prod, w_hat.to(cdt).transpose(1, 2))
        if need_x:
            gx = _decode(g_xhat, enc_x.to(cdt).t(), n, m, B, Mt, M, K).to(x.dtype)
        if need_e:
            ge = _tiles_wgrad(x.to(cdt), g_xhat, n, m, Mt, Kt).to(enc_x.dtype)
    return gx, gw, ge, gd, None, None, None, None


stl_forward.register_autograd(_backward, setup_context=_setup_context)
