"""The Strassen-Tile (STL) operator as pure functions.

Notation (tile format <n,m,p>: activation tiles n x m, weight tiles m x p, output tiles n x p;
the square case is n = m = p = t):

    x:     (..., M, K)        activations; every leading index is an independent matrix
    w:     (K, N)             dense weight (y = x @ w)
    enc_x: (r, n*m)           E_x,  x_hat[l, a, c] = sum_ij E_x[l, i*m+j] x[a*n+i, c*m+j]
    enc_w: (r, m*p)           E_w,  w_hat[l, c, b] = sum_jk E_w[l, j*p+k] w[c*m+j, b*p+k]
    w_hat: (r, K/m, N/p)      the encoded weight (what STLinear learns)
    core:  P[l] = x_hat[l] @ w_hat[l]                           one bmm of r matrices
    dec:   (n*p, r)           y[a*n+i, b*p+k] = sum_l dec[i*p+k, l] P[l, a, b]

Rows: a tile mixes n consecutive rows of the same matrix ``x[..., :, :]``; rows of different leading
indices never mix. Sizes that are not multiples of the tile are zero-padded and sliced back
(zero rows/columns contribute nothing to a bilinear form, so padding never changes real outputs).

Two paths compute the same thing: ``*_reference`` (einsum on 6-D views, easy to read) and the
default fast path (the ``strassenkit::stl_forward`` custom op in :mod:`.ops`: encode straight into
the bmm layout, one bmm, decode, and a custom backward; native C++ kernels for float32/float64 on CPU,
pure-PyTorch ops otherwise). Tests check one against the other.
"""

from __future__ import annotations

import math

import torch

from ..algorithms import BilinearAlgorithm
from .._utils import ceil_div, pad_last2
from . import ops as _ops

__all__ = [
    "stl_matmul",
    "stl_encode_weight",
    "stl_apply",
    "stl_apply_reference",
    "stl_encode_weight_reference",
    "tile_format",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tile_format(enc_x: torch.Tensor, dec: torch.Tensor, tile) -> tuple[int, int, int]:
    """Resolve (n, m, p) from ``tile`` (int t for t x t tiles, or a tuple (n, m, p)) and check shapes."""
    if isinstance(tile, int):
        n = m = p = tile
    else:
        try:
            n, m, p = (int(v) for v in tile)
        except (TypeError, ValueError):
            raise ValueError(f"tile must be an int t or a tuple (n, m, p), got {tile!r}") from None
    if min(n, m, p) < 1:
        raise ValueError(f"tile sizes must be >= 1, got {(n, m, p)}")
    if enc_x.dim() != 2 or enc_x.shape[1] != n * m:
        raise ValueError(f"enc_x must have shape (rank, {n * m}) for {n}x{m} activation tiles, got {tuple(enc_x.shape)}")
    r = enc_x.shape[0]
    if dec.shape != (n * p, r):
        raise ValueError(f"dec must have shape ({n * p}, {r}) for {n}x{p} output tiles and rank {r}, got {tuple(dec.shape)}")
    return n, m, p


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64/bfloat16), got {t.dtype}; cast it with .float()")


# --------------------------------------------------------------------------- weight encoding
def stl_encode_weight(w: torch.Tensor, enc_w: torch.Tensor, tile) -> torch.Tensor:
    """Encode a dense weight w (K, N) into w_hat (r, ceil(K/m), ceil(N/p)) with E_w (r, m*p)."""
    _check_float("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (K, N) weight, got shape {tuple(w.shape)}")
    n, m, p = (tile, tile, tile) if isinstance(tile, int) else tuple(tile)
    if enc_w.dim() != 2 or enc_w.shape[1] != m * p:
        raise ValueError(f"enc_w must have shape (rank, {m * p}) for {m}x{p} weight tiles, got {tuple(enc_w.shape)}")
    K, N = w.shape
    Kt, Nt = ceil_div(K, m), ceil_div(N, p)
    w = pad_last2(w, Kt * m, Nt * p)
    tiles = w.reshape(Kt, m, Nt, p).permute(1, 3, 0, 2).reshape(m * p, Kt * Nt)
    return (enc_w.to(w.dtype) @ tiles).reshape(enc_w.shape[0], Kt, Nt)  # not -1: ambiguous when K == 0


def stl_encode_weight_reference(w: torch.Tensor, enc_w: torch.Tensor, tile) -> torch.Tensor:
    """Slow, readable version of :func:`stl_encode_weight` (einsum over explicit tiles)."""
    n, m, p = (tile, tile, tile) if isinstance(tile, int) else tuple(tile)
    K, N = w.shape
    Kt, Nt = ceil_div(K, m), ceil_div(N, p)
    w = pad_last2(w, Kt * m, Nt * p)
    tiles = w.reshape(Kt, m, Nt, p)  # [c, j, b, k]
    return torch.einsum("ljk,cjbk->lcb", enc_w.to(w.dtype).reshape(-1, m, p), tiles)


# --------------------------------------------------------------------------- the operator
def _check_same_device(x, **operands) -> None:
    """ValueError naming the first operand that is not on x's device (a meta operand has no values)."""
    for name, t in operands.items():
        if t is not None and t.device != x.device:
            hint = (" (a meta tensor has no values: the layer was built on the meta device, or loaded with "
                    "load_state_dict(assign=True) with this key missing; materialize it with .to_empty(device=...) "
                    "and load its weights)" if t.is_meta else "; move both to one device with .to(device)")
            raise ValueError(f"{name} is on device {t.device} but x is on {x.device}{hint}")


def _check_apply(x, w_hat, enc_x, dec, tile):
    for name, t in (("x", x), ("w_hat", w_hat), ("enc_x", enc_x), ("dec", dec)):
        _check_float(name, t)
    _check_same_device(x, w_hat=w_hat, enc_x=enc_x, dec=dec)
    n, m, p = tile_format(enc_x, dec, tile)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., M, K), got shape {tuple(x.shape)}")
    r = enc_x.shape[0]
    Kt = ceil_div(x.shape[-1], m)
    if w_hat.dim() != 3 or w_hat.shape[0] != r or w_hat.shape[1] != Kt:
        raise ValueError(
            f"w_hat must have shape (rank={r}, ceil(K/{m})={Kt}, N/{p}) for x with K={x.shape[-1]}, "
            f"got {tuple(w_hat.shape)}"
        )
    return n, m, p


def stl_apply(
    x: torch.Tensor,
    w_hat: torch.Tensor,
    enc_x: torch.Tensor,
    dec: torch.Tensor,
    tile,
    out_features: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """STL product of x (..., M, K) with an already-encoded weight w_hat (r, K/m, N/p) (+ bias).

    enc_x (r, n*m), dec (n*p, r); returns (..., M, out_features) (default N = p * w_hat.shape[2])
    in x's dtype; ``bias`` (N,), if given, is added (the native kernels add it while writing y). Fast path: the ``strassenkit::stl_forward`` custom op (see
    :mod:`strassenkit.functional.ops`): one permute-copy + one matmul to encode straight into the
    (r, B*M/n, K/m) bmm layout, one bmm, one matmul + one permute-copy to decode, and a hand-written
    backward that keeps only x_hat and the core products. Works under torch.compile and export.

    Autocast: inside ``torch.autocast`` all four operands are cast to the autocast dtype (like a
    matmul); bf16/fp16 compute in float32 on CPUs without native bf16 GEMMs (output still bf16).
    """
    n, m, p = _check_apply(x, w_hat, enc_x, dec, tile)
    r, Kt, Nt = w_hat.shape
    lead, (M, K) = x.shape[:-2], x.shape[-2:]
    N = out_features if out_features is not None else Nt * p
    if not isinstance(N, int) or not (Nt - 1) * p < N <= Nt * p:
        raise ValueError(
            f"out_features must be an int in ({(Nt - 1) * p}, {Nt * p}] for w_hat with {Nt} column tiles of {p}, got {N!r}"
        )
    if bias is not None:
        _check_float("bias", bias)
        _check_same_device(x, bias=bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},) (out_features), got {tuple(bias.shape)}")
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):  # meta has no autocast
        adt = torch.get_autocast_dtype(dev)
        x, w_hat, enc_x, dec = (t.to(adt) for t in (x, w_hat, enc_x, dec))
        with torch.autocast(dev, enabled=False):
            return stl_apply(x, w_hat, enc_x, dec, (n, m, p), N, bias=None if bias is None else bias.to(adt))
    x3 = x if x.dim() == 3 else x.reshape(math.prod(lead), M, K)  # not -1: ambiguous when M == 0
    if x3.numel() == 0:  # no rows or K == 0: zeros, like x @ w; every operand gets a zero gradient of its shape
        link = sum(t.reshape(-1)[:0].sum() for t in (x, w_hat, enc_x, dec))  # exactly 0, never NaN
        y = x.new_zeros((*lead, M, N)) + link.to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)
    operands = (w_hat, enc_x, dec) if bias is None else (w_hat, enc_x, dec, bias)
    if _ops.plain_eager(x3, *operands):  # eager: the op's own functions without its dispatch (same values)
        if not (torch.is_grad_enabled() and (x3.requires_grad or any(t.requires_grad for t in operands))):
            return _ops.stl_infer(x3, w_hat, enc_x, dec, n, m, p, N, bias).reshape(*lead, M, N)
        if _ops.eager_bias_ok(x3, bias):  # the kernels add the bias; one autograd node, no extra pass over y
            y = _ops.EagerSTL.apply(x3, w_hat, enc_x, dec, n, m, p, N, bias)
            return y if y.dim() == x.dim() else y.reshape(*lead, M, N)
        y = _ops.EagerSTL.apply(x3, w_hat, enc_x, dec, n, m, p, N, None)
    elif _ops.flop_counting_active():  # FlopCounterMode cannot look inside a custom op
        y = _ops.stl_forward_plain(x3, w_hat, enc_x, dec, n, m, p, N)
        return (y if bias is None else y + bias.to(y.dtype)).reshape(*lead, M, N)
    else:
        y = _ops.stl_forward(x3, w_hat, enc_x, dec, n, m, p, N)[0]
    if bias is not None:  # in place: y is the op's fresh output, which its backward does not need
        y = y.add_(bias.to(y.dtype))
    return y.reshape(*lead, M, N)


def stl_apply_reference(x, w_hat, enc_x, dec, tile, out_features=None):
    """Slow, readable version of :func:`stl_apply`: einsum over explicit 6-D tile views."""
    n, m, p = _check_apply(x, w_hat, enc_x, dec, tile)
    r, Kt, Nt = w_hat.shape
    lead, (M, K) = x.shape[:-2], x.shape[-2:]
    N = out_features if out_features is not None else Nt * p
    Mt = ceil_div(M, n)
    xp = pad_last2(x, Mt * n, Kt * m)
    xt = xp.reshape(*lead, Mt, n, Kt, m)  # [..., a, i, c, j]
    x_hat = torch.einsum("lij,...aicj->...lac", enc_x.to(x.dtype).reshape(r, n, m), xt)
    prod = torch.einsum("...lac,lcb->...lab", x_hat, w_hat.to(x.dtype))
    yt = torch.einsum("ikl,...lab->...aibk", dec.to(x.dtype).reshape(n, p, r), prod)
    y = yt.reshape(*lead, Mt * n, Nt * p)
    return y[..., :M, :N]


def stl_matmul(x: torch.Tensor, w: torch.Tensor, algorithm: BilinearAlgorithm | str, reference: bool = False) -> torch.Tensor:
    """x (..., M, K) @ w (K, N) computed by the STL operator with ``algorithm``'s (U, V, W).

    ``algorithm`` is a :class:`BilinearAlgorithm` (or catalogue name) of format <n,m,p>: activation
    tiles are n x m, weight tiles m x p. With an exact algorithm the result equals x @ w up to
    floating-point rounding. Any M, K, N (zero-padded to tile multiples and sliced back).
    """
    if isinstance(algorithm, str):
        from ..algorithms import get

        algorithm = get(algorithm)
    if not isinstance(algorithm, BilinearAlgorithm):
        raise TypeError(f"algorithm must be a BilinearAlgorithm or a catalogue name, got {type(algorithm).__name__}")
    _check_float("x", x)
    _check_float("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (K, N) matrix, got shape {tuple(w.shape)}")
    if x.dim() < 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} @ w {tuple(w.shape)}: x.shape[-1] must equal w.shape[0]")
    enc_x, enc_w, dec = (t.to(device=x.device, dtype=x.dtype) for t in algorithm.stl_matrices())
    tile = algorithm.format
    if reference:
        w_hat = stl_encode_weight_reference(w, enc_w, tile)
        return stl_apply_reference(x, w_hat, enc_x, dec, tile, out_features=w.shape[1])
    w_hat = stl_encode_weight(w, enc_w, tile)
    return stl_apply(x, w_hat, enc_x, dec, tile, out_features=w.shape[1])
