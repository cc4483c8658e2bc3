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

import functools

import torch
from torch import Tensor

__all__ = ["stl_forward", "compute_dtype", "native_low_precision"]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


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


# --------------------------------------------------------------------------- layout helpers
def _tiles(x: Tensor, n: int, m: int, Mt: int, Kt: int) -> Tensor:
    """x (B, M, K) -> (n*m, B*Mt*Kt): zero-pad to tile multiples, one permute-copy."""
    B, M, K = x.shape
    pr, pc = Mt * n - M, Kt * m - K
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.reshape(B, Mt, n, Kt, m).permute(2, 4, 0, 1, 3).reshape(n * m, B * Mt * Kt)


def _untile(t: Tensor, n: int, m: int, B: int, Mt: int, Kt: int, M: int, K: int) -> Tensor:
    """Inverse of :func:`_tiles`: (n*m, B*Mt*Kt) -> (B, M, K) contiguous (padding dropped)."""
    y = t.view(n, m, B, Mt, Kt).permute(2, 3, 0, 4, 1)
    if Mt * n == M and Kt * m == K:
        return y.reshape(B, M, K).contiguous()  # reshape is a view when n == 1 or m == 1
    return y.reshape(B, Mt * n, Kt * m)[:, :M, :K].contiguous()


def _forward_impl(x, w_hat, enc_x, dec, n, m, p, out_features):
    B, M, K = x.shape
    r, Kt, Nt = w_hat.shape
    Mt = _ceil(M, n)
    cdt = compute_dtype(x.dtype, x.device.type)
    xt = _tiles(x.to(cdt), n, m, Mt, Kt)
    x_hat = (enc_x.to(cdt) @ xt).view(r, B * Mt, Kt)
    prod = torch.bmm(x_hat, w_hat.to(cdt))
    yt = dec.to(cdt) @ prod.view(r, B * Mt * Nt)
    y = _untile(yt, n, p, B, Mt, Nt, M, out_features)
    return y.to(x.dtype), x_hat, prod


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


def _backward(ctx, grad_y, _grad_xhat, _grad_prod):
    x, w_hat, enc_x, dec, x_hat, prod = ctx.saved_tensors
    n, m, p = ctx.fmt
    need_x, need_w, need_e, need_d = ctx.needs_input_grad[:4]
    B, M, K = x.shape
    r, Kt, Nt = w_hat.shape
    Mt = _ceil(M, n)
    cdt = x_hat.dtype
    gt = _tiles(grad_y.to(cdt), n, p, Mt, Nt)  # (n*p, B*Mt*Nt)
    gx = gw = ge = gd = None
    if need_d:
        gd = (gt @ prod.view(r, -1).t()).to(dec.dtype)
    if need_x or need_w or need_e:
        g_prod = (dec.to(cdt).t() @ gt).view(r, B * Mt, Nt)
        if need_w:
            gw = torch.bmm(x_hat.transpose(1, 2), g_prod).to(w_hat.dtype)
        if need_x or need_e:
            g_xhat = torch.bmm(g_prod, w_hat.to(cdt).transpose(1, 2)).view(r, B * Mt * Kt)
            if need_x:
                gx = _untile(enc_x.to(cdt).t() @ g_xhat, n, m, B, Mt, Kt, M, K).to(x.dtype)
            if need_e:
                ge = (g_xhat @ _tiles(x.to(cdt), n, m, Mt, Kt).t()).to(enc_x.dtype)
    return gx, gw, ge, gd, None, None, None, None


stl_forward.register_autograd(_backward, setup_context=_setup_context)
