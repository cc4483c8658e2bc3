"""Sum-product network (StrassenNets) math as pure functions.

StrassenNets (Tschannen, Khanna, Anandkumar, ICML 2018) writes a bilinear map as a 2-layer
sum-product network with ``r`` hidden products (the multiplication budget)::

    vec(C) = W_c [ (W_b vec B) * (W_a vec A) ]

Shapes used throughout: ``W_a`` (r, in_a), ``W_b`` (r, in_b), ``W_c`` (out, r).  In the standard
form of :class:`strassenkit.algorithms.BilinearAlgorithm` this is ``W_a = U.T``, ``W_b = V.T``,
``W_c = W``.

For a layer whose weight is learned (Linear / Conv2d) ``W_a vec A`` is a learned vector
``a_hat`` (r,) held in full precision, so ``y = W_c [(W_b x) * a_hat] + bias``.

Every fast function has a slow reference beside it (``*_reference``) computed in an independent
way (einsum over explicit indices / explicit patch loops) and the tests compare them in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "spn_bilinear",
    "spn_bilinear_reference",
    "spn_linear",
    "spn_linear_reference",
    "spn_conv2d",
    "spn_conv2d_reference",
    "conv_output_size",
    "spn_conv_geometry",
    "pair",
]


def pair(v, name: str) -> tuple[int, int]:
    """Normalize an int or a pair of ints to a tuple (h, w); ``name`` is used in the error."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check_2d(t: torch.Tensor, rows: int | None, cols: int | None, name: str):
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")


# ---------------------------------------------------------------------- bilinear
def spn_bilinear(a: torch.Tensor, b: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
    """``W_c[(W_b b) * (W_a a)]`` for batches of vectors.

    Args:
        a: (..., in_a);  b: (..., in_b) with the same leading shape (broadcastable).
        w_a: (r, in_a);  w_b: (r, in_b);  w_c: (out, r).
    Returns:
        (..., out)
    """
    _check_2d(w_a, None, a.shape[-1], "w_a")
    r = w_a.shape[0]
    _check_2d(w_b, r, b.shape[-1], "w_b")
    _check_2d(w_c, None, r, "w_c")
    return ((a @ w_a.T) * (b @ w_b.T)) @ w_c.T


def spn_bilinear_reference(a, b, w_a, w_b, w_c) -> torch.Tensor:
    """Slow reference of :func:`spn_bilinear`: one einsum over the explicit 3-way tensor."""
    t = torch.einsum("ri,rj,or->ijo", w_a, w_b, w_c)  # the bilinear map's tensor
    return torch.einsum("...i,...j,ijo->...o", a, b, t)


# ---------------------------------------------------------------------- linear
def spn_linear(x: torch.Tensor, w_b: torch.Tensor, a_hat: torch.Tensor, w_c: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = W_c[(W_b x) * a_hat] + bias``.

    Args:
        x: (..., K);  w_b: (r, K);  a_hat: (r,);  w_c: (N, r);  bias: (N,) or None.
    Returns:
        (..., N)
    """
    _check_2d(w_b, None, x.shape[-1], "w_b")
    r = w_b.shape[0]
    if a_hat.shape != (r,):
        raise ValueError(f"a_hat must have shape ({r},), got {tuple(a_hat.shape)}")
    _check_2d(w_c, None, r, "w_c")
    y = (x @ w_b.T * a_hat) @ w_c.T
    return y if bias is None else y + bias


def spn_linear_reference(x, w_b, a_hat, w_c, bias=None) -> torch.Tensor:
    """Slow reference of :func:`spn_linear`: the dense matrix W_c diag(a_hat) W_b, then x @ W^T."""
    dense = torch.einsum("nr,r,rk->nk", w_c, a_hat, w_b)
    y = torch.einsum("...k,nk->...n", x, dense)
    return y if bias is None else y + bias


# ---------------------------------------------------------------------- conv2d
def conv_output_size(size: int, kernel: int, stride: int, pad_total: int) -> int:
    """nn.Conv2d's output size along one axis (dilation 1): floor((size + pad - k) / s) + 1."""
    return (size + pad_total - kernel) // stride + 1


def spn_conv_geometry(h: int, w: int, kernel, stride, padding, out_patch) -> dict:
    """Sizes used by :func:`spn_conv2d` for an (h, w) input.

    ``padding`` is (top, bottom, left, right).  Returns the dense conv output size (out_h, out_w),
    the number of p x p patches (ph, pw), the SPN window (win_h, win_w) = ((p-1)s+k), the extra
    zero padding at the bottom/right needed so the last window fits, and the padded input extent
    (need_h, need_w) the patches read (rows/columns beyond it are never used).
    """
    kh, kw = kernel
    sh, sw = stride
    pt, pb, pl, pr = padding
    qh, qw = out_patch
    out_h = conv_output_size(h, kh, sh, pt + pb)
    out_w = conv_output_size(w, kw, sw, pl + pr)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel {kernel} with padding {padding}: "
            f"the convolution output would be {(out_h, out_w)}"
        )
    ph, pw = math.ceil(out_h / qh), math.ceil(out_w / qw)
    win_h, win_w = (qh - 1) * sh + kh, (qw - 1) * sw + kw
    need_h = (ph - 1) * qh * sh + win_h
    need_w = (pw - 1) * qw * sw + win_w
    extra_h = max(0, need_h - (h + pt + pb))
    extra_w = max(0, need_w - (w + pl + pr))
    return dict(out_h=out_h, out_w=out_w, ph=ph, pw=pw, win_h=win_h, win_w=win_w, extra_h=extra_h, extra_w=extra_w,
                need_h=need_h, need_w=need_w)


def spn_conv2d(
    x: torch.Tensor,
    w_b: torch.Tensor,
    a_hat: torch.Tensor,
    w_c: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size,
    stride,
    padding,
    out_patch,
    groups: int = 1,
    hidden_fn=None,
) -> torch.Tensor:
    """StrassenNets convolution: every p x p output patch from its ((p-1)s+k)-sized input window.

    Args:
        x: (B, C_in, H, W).
        w_b: (r, C_in/groups, (p_h-1)s_h+k_h, (p_w-1)s_w+k_w), applied as a conv with stride p*s.
        a_hat: (r,), multiplied channel-wise.
        w_c: (r, C_out/groups, p_h, p_w), applied as a transposed conv with kernel p, stride p.
        bias: (C_out,) or None.
        kernel_size, stride, out_patch: pairs (h, w);  padding: (top, bottom, left, right) zeros.
        hidden_fn: optional callable on the hidden (B, r, P_h, P_w) tensor before the a_hat product
            (the layer's normalization of W_b x).
    Returns:
        (B, C_out, H_out, W_out) with exactly nn.Conv2d's output size for the same kernel, stride
        and padding.  The patch grid is ceil(H_out/p) x ceil(W_out/p); the window of the last patch
        is zero padded at the bottom/right and the surplus outputs are cropped.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, channels, height, width), got shape {tuple(x.shape)}")
    g = spn_conv_geometry(x.shape[2], x.shape[3], kernel_size, stride, padding, out_patch)
    pt, pb, pl, pr = padding
    xp = F.pad(x, (pl, pr + g["extra_w"], pt, pb + g["extra_h"]))[:, :, : g["need_h"], : g["need_w"]]
    sh, sw = stride
    qh, qw = out_patch
    h = F.conv2d(xp, w_b, None, stride=(qh * sh, qw * sw), groups=groups)  # (B, r, ph, pw) exactly
    if hidden_fn is not None:
        h = hidden_fn(h)
    h = h * a_hat.view(1, -1, 1, 1)
    y = F.conv_transpose2d(h, w_c, None, stride=(qh, qw), groups=groups)
    y = y[:, :, : g["out_h"], : g["out_w"]]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def spn_conv2d_reference(x, w_b, a_hat, w_c, bias, kernel_size, stride, padding, out_patch, groups: int = 1) -> torch.Tensor:
    """Slow reference of :func:`spn_conv2d`: explicit loops over output patches and groups.

    Each patch (i, j) reads the window starting at (i*p_h*s_h, j*p_w*s_w) of the zero-padded input,
    computes h = W_b window (per group), multiplies by a_hat and writes W_c h into the p x p block.
    """
    B, C, H, W = x.shape
    g = spn_conv_geometry(H, W, kernel_size, stride, padding, out_patch)
    pt, pb, pl, pr = padding
    xp = F.pad(x, (pl, pr + g["extra_w"], pt, pb + g["extra_h"]))
    sh, sw = stride
    qh, qw = out_patch
    r = w_b.shape[0]
    c_out = w_c.shape[1] * groups
    rg, cg, og = r // groups, C // groups, c_out // groups
    out = x.new_zeros(B, c_out, g["ph"] * qh, g["pw"] * qw)
    for i in range(g["ph"]):
        for j in range(g["pw"]):
            y0, x0 = i * qh * sh, j * qw * sw
            win = xp[:, :, y0 : y0 + g["win_h"], x0 : x0 + g["win_w"]]
            for gi in range(groups):
                wb = w_b[gi * rg : (gi + 1) * rg].reshape(rg, -1)
                hid = win[:, gi * cg : (gi + 1) * cg].reshape(B, -1) @ wb.T  # (B, rg)
                hid = hid * a_hat[gi * rg : (gi + 1) * rg]
                wc = w_c[gi * rg : (gi + 1) * rg]  # (rg, og, qh, qw)
                blk = torch.einsum("br,rouv->bouv", hid, wc)
                out[:, gi * og : (gi + 1) * og, i * qh : (i + 1) * qh, j * qw : (j + 1) * qw] += blk
    out = out[:, :, : g["out_h"], : g["out_w"]]
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
