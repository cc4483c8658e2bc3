"""Triton kernels for the memory-bound stages of STL on a GPU: tile gather + encode, decode + scatter.

The STL fast path (:mod:`.ops`) has three stages; on a GPU only the middle one is compute-bound:

    encode:  x (B, M, K)  -> x_hat (r, B*Mt, Kt)     gather every n x m tile, multiply by E (r, n*m)
    core:    prod = bmm(x_hat, w_hat)                one batched GEMM (cuBLAS), stays torch.bmm
    decode:  prod (r, B*Mt, Nt) -> y (B, M, N)       multiply by D (n*p, r), scatter every n x p tile

In pure PyTorch the encode is a permute-copy of x into tile layout plus an ``mm``, the decode an
``mm`` plus a permute-copy back: each stage reads and writes its data twice. Here each is one kernel
that reads x (or prod) once and writes x_hat (or y) once: a program takes ``BLOCK_T`` consecutive tiles,
loads them straight from the strided input (zero padding by masks, no padded copy), multiplies them
with the (r, n*m) encoder in registers (``tl.dot``) and stores the result in its final layout.
A third kernel computes the encoder/decoder gradients, sum over tiles of G x tiles^T, from the same
tile loads without materializing the tiles (one partial sum per program, then one ``sum`` over the
programs: deterministic, no atomics).

Numerics: tiles and codec are loaded in their dtype and cast to float32 inside the kernel; the dot
accumulates in float32 (``input_precision="ieee"`` for float32 inputs; for bf16/fp16 inputs "tf32",
which represents every bf16/fp16 value exactly) and the result is rounded once to the output dtype.
The cast also sidesteps the Triton interpreter's wrong bf16 ``tl.dot``. The pure-PyTorch path stays
the reference; tests run these kernels on the CPU with ``TRITON_INTERPRET=1``.

Used automatically for CUDA tensors when Triton imports (``ops.backend("torch")`` turns it off);
``ops.backend("triton")`` forces it, also for CPU tensors when ``TRITON_INTERPRET=1`` was set before
the first use (the kernels are built lazily, on first call, so the setting is read then).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["available", "interpreting", "encode", "decode", "tiles_wgrad"]

_MAX_WGRAD_PROGRAMS = 512


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    if os.environ.get("STRASSENKIT_TRITON", "1") == "0" or importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - a broken triton install: fall back to PyTorch
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def available(device_type: str = "cuda") -> bool:
    """Whether the kernels can run on tensors of ``device_type`` (CUDA, or CPU in the interpreter)."""
    if not _importable():
        return False
    if device_type == "cuda":
        return _cuda_available() or interpreting()
    return device_type == "cpu" and interpreting()


def _p2(v: int, lo: int = 16) -> int:
    """Next power of two >= max(v, lo) (tl.arange sizes; tl.dot wants every dim >= 16)."""
    out = lo
    while out < v:
        out *= 2
    return out


def _kernels():
    # imported on first use: the kernels are built (compiled or interpreted) per TRITON_INTERPRET then
    from . import _triton_kernels as k

    return k.encode_kernel, k.decode_kernel, k.wgrad_kernel


def _block_t(device: torch.device) -> int:
    return 16 if device.type != "cuda" or interpreting() else 128


def _num_warps(block_t: int) -> int:
    return 4 if block_t >= 64 else 1


def _ieee(*ts: Tensor) -> bool:
    return any(t.dtype in (torch.float32, torch.float64) for t in ts)


def _check(name: str, t: Tensor, dims: int):
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton STL kernels take float32/float16/bfloat16, got {name} in {t.dtype}")


def encode(x: Tensor, enc: Tensor, n: int, m: int, Mt: int, Kt: int, out: Tensor | None = None,
           block_t: int | None = None) -> Tensor:
    """x (B, M, K) (any strides) -> x_hat (r, B*Mt, Kt) in x's dtype; enc (r, n*m) (any strides).

    x_hat[l, b*Mt+a, c] = sum_ij enc[l, i*m+j] x[b, a*n+i, c*m+j] (zero outside M, K).
    ``out``: optional (r, B*Mt, Kt) tensor whose last two dims are contiguous.
    """
    _check("x", x, 3)
    _check("enc", enc, 2)
    B, M, K = x.shape
    r = enc.shape[0]
    if enc.shape[1] != n * m:
        raise ValueError(f"enc must be (r, {n * m}), got {tuple(enc.shape)}")
    T = B * Mt * Kt
    if out is None:
        out = torch.empty((r, B * Mt, Kt), device=x.device, dtype=x.dtype)
    elif out.shape != (r, B * Mt, Kt) or out.stride(2) != 1 or out.stride(1) != Kt:
        raise ValueError(f"out must be ({r}, {B * Mt}, {Kt}) with contiguous last two dims")
    if T == 0 or r == 0:
        return out
    bt = block_t or _block_t(x.device)
    enc_k, _, _ = _kernels()
    grid = (-(-T // bt),)
    enc_k[grid](x, enc, out, T, Mt, Kt, M, K, *x.stride(), *enc.stride(), out.stride(0),
                R=r, TN=n, TM=m, R_PAD=_p2(r), E_PAD=_p2(n * m), BLOCK_T=bt, IEEE=_ieee(x, enc),
                num_warps=_num_warps(bt))
    return out


def decode(P: Tensor, dec: Tensor, n: int, p: int, B: int, Mt: int, M: int, N: int, out: Tensor | None = None,
           block_t: int | None = None) -> Tensor:
    """P (r, B*Mt, Nt) (last two dims contiguous) -> y (B, M, N) in P's dtype; dec (n*p, r) (any strides).

    y[b, a*n+i, c*p+k] = sum_l dec[i*p+k, l] P[l, b*Mt+a, c] (tiles beyond M, N are not stored).
    ``out``: optional (B, M, N) tensor with any strides.
    """
    _check("P", P, 3)
    _check("dec", dec, 2)
    r, BMt, Nt = P.shape
    if dec.shape != (n * p, r):
        raise ValueError(f"dec must be ({n * p}, {r}), got {tuple(dec.shape)}")
    if BMt != B * Mt:
        raise ValueError(f"P has {BMt} row tiles, expected B*Mt = {B * Mt}")
    if P.stride(2) != 1 or P.stride(1) != Nt:
        P = P.contiguous()
    if out is None:
        out = torch.empty((B, M, N), device=P.device, dtype=P.dtype)
    elif out.shape != (B, M, N):
        raise ValueError(f"out must be ({B}, {M}, {N}), got {tuple(out.shape)}")
    T = BMt * Nt
    if T == 0 or out.numel() == 0:
        return out
    bt = block_t or _block_t(P.device)
    _, dec_k, _ = _kernels()
    grid = (-(-T // bt),)
    dec_k[grid](P, dec, out, T, Mt, Nt, M, N, P.stride(0), *dec.stride(), *out.stride(),
                R=r, TN=n, TP=p, R_PAD=_p2(r), O_PAD=_p2(n * p), BLOCK_T=bt, IEEE=_ieee(P, dec),
                num_warps=_num_warps(bt))
    return out


def tiles_wgrad(x: Tensor, g: Tensor, n: int, m: int, Mt: int, Kt: int, block_t: int | None = None) -> Tensor:
    """sum over tiles of g (r, B*Mt, Kt) x tiles(x)^T -> (r, n*m) in x's dtype (float32 accumulation)."""
    _check("x", x, 3)
    _check("g", g, 3)
    B, M, K = x.shape
    r = g.shape[0]
    if g.shape != (r, B * Mt, Kt):
        raise ValueError(f"g must be ({r}, {B * Mt}, {Kt}), got {tuple(g.shape)}")
    if g.stride(2) != 1 or g.stride(1) != Kt:
        g = g.contiguous()
    T = B * Mt * Kt
    if T == 0 or r == 0:
        return x.new_zeros((r, n * m))
    bt = block_t or _block_t(x.device)
    blocks = -(-T // bt)
    progs = min(blocks, _MAX_WGRAD_PROGRAMS)
    n_iter = -(-blocks // progs)
    R_PAD, E_PAD = _p2(r), _p2(n * m)
    part = torch.empty((progs, R_PAD, E_PAD), device=x.device, dtype=torch.float32)
    _, _, wg_k = _kernels()
    wg_k[(progs,)](x, g, part, T, Mt, Kt, M, K, *x.stride(), g.stride(0), n_iter,
                   R=r, TN=n, TM=m, R_PAD=R_PAD, E_PAD=E_PAD, BLOCK_T=bt, IEEE=_ieee(x, g),
                   num_warps=_num_warps(bt))
    return part.sum(0)[:r, : n * m].to(x.dtype)
