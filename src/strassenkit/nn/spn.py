"""StrassenNets layers: ``SPNBilinear``, ``SPNLinear``, ``SPNConv2d``.

Each layer keeps full-precision "shadow" matrices (``w_a``, ``w_b``, ``w_c``) and quantizes them to
``scale * {-1, 0, 1}`` in the forward pass according to its training *phase* (see
:mod:`strassenkit.nn.phase`):

======== =================================================================================
phase    forward pass
======== =================================================================================
full     all matrices in full precision
ternary  encoders (``w_a``, ``w_b``) and decoder ``w_c`` ternary, straight-through gradients
ternary_b  only the encoders ternary (``w_b``; and ``w_a`` for SPNBilinear)
ternary_c  only the decoder ``w_c`` ternary
frozen   all ternary and fixed: no gradient reaches them; a_hat / normalization / bias train
======== =================================================================================

The forward pass reads the phase from a plain Python attribute (no tensor read, so no host sync
per layer per step on a GPU, and ``torch.compile(fullgraph=True)`` specializes on it: switching the
phase recompiles once). For ``state_dict()`` / ``load_state_dict()`` it is mirrored in a persistent
int8 buffer ``spn_phase`` (the same key as before, on the layer's device): :meth:`SPNModule.set_phase`
writes both, and loading a state dict restores the attribute from the loaded value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import check_int
from ..functional.spn import pair, spn_bilinear, spn_conv2d, spn_conv_geometry, spn_linear
from .quantize import TernaryQuantizer

__all__ = ["PHASES", "SPNModule", "SPNBilinear", "SPNLinear", "SPNConv2d", "DensePatchConv2d"]

PHASES: tuple[str, ...] = ("full", "ternary", "ternary_b", "ternary_c", "frozen")


def _make_quantizer(q) -> TernaryQuantizer:
    if isinstance(q, TernaryQuantizer):
        return q
    if q in ("twn", "fixed"):
        return TernaryQuantizer(q)
    raise ValueError(f"quantizer must be 'twn', 'fixed' or a TernaryQuantizer, got {q!r}")


class SPNModule(nn.Module):
    """Base class: phase buffer, quantization of the ternary matrices, freezing.

    Subclasses list their encoder matrices in ``_encoders`` and decoder matrices in ``_decoders``.
    """

    _encoders: tuple[str, ...] = ("w_b",)
    _decoders: tuple[str, ...] = ("w_c",)

    def _init_phase(self, quantizer, device=None):
        self.quantizer = _make_quantizer(quantizer)
        self._phase = "full"  # what forward reads: a Python attribute, never a tensor
        # the state_dict copy of the phase (key "spn_phase", kept for checkpoint compatibility)
        self.register_buffer("spn_phase", torch.zeros((), dtype=torch.int8, device=device), persistent=True)

    # ------------------------------------------------------------ phase
    @property
    def phase(self) -> str:
        return self._phase

    def set_phase(self, phase: str) -> "SPNModule":
        """Switch the training phase (one of :data:`PHASES`); freezes the matrices in "frozen"."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._phase = phase
        self.spn_phase.fill_(PHASES.index(phase))  # an asynchronous device write, no host read
        self._apply_requires_grad()
        return self

    def _apply_requires_grad(self):
        frozen = self._phase == "frozen"
        for name in self.ternary_names():
            getattr(self, name).requires_grad_(not frozen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        value = state_dict.get(prefix + "spn_phase")
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
            # one host read at load time (not per step); a meta / fake value carries no phase
            try:
                idx = int(value.detach().reshape(()).item())
            except (RuntimeError, NotImplementedError):  # e.g. a fake tensor: keep the current phase
                idx = None
            if idx is not None:
                if not 0 <= idx < len(PHASES):
                    raise ValueError(f"{prefix}spn_phase: {idx} is not a phase index (0..{len(PHASES) - 1})")
                self._phase = PHASES[idx]
        self._apply_requires_grad()  # the phase was just loaded: re-freeze if needed

    def ternary_names(self) -> tuple[str, ...]:
        return self._encoders + self._decoders

    def is_quantized(self, name: str) -> bool:
        """Whether matrix ``name`` is ternary in the current phase."""
        ph = self._phase
        if ph in ("ternary", "frozen"):
            return True
        if ph == "ternary_b":
            return name in self._encoders
        if ph == "ternary_c":
            return name in self._decoders
        return False

    def effective(self, name: str) -> torch.Tensor:
        """The matrix ``name`` as used by the forward pass in the current phase."""
        w = getattr(self, name)
        if not self.is_quantized(name):
            return w
        q = self.quantizer(w)
        return q.detach() if self._phase == "frozen" else q

    def ternary_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 values in {-1,0,1}, scale) of matrix ``name`` under this layer's quantizer."""
        return self.quantizer.parts(getattr(self, name))

    def _hidden_norm_scale_shift(self, r: int, ref: torch.Tensor):
        """Eval-mode normalization of W_b x as (scale, shift): norm(z) = z * scale + shift."""
        if self.norm is None:
            return torch.ones(r, dtype=ref.dtype, device=ref.device), torch.zeros(r, dtype=ref.dtype, device=ref.device)
        bn = self.norm
        inv = 1.0 / torch.sqrt(bn.running_var.to(ref.dtype) + bn.eps)
        return inv, -bn.running_mean.to(ref.dtype) * inv


def _make_norm(norm, r, dim, device, dtype):
    if norm is None:
        return None
    if norm == "batch":
        cls = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        return cls(r, affine=False, device=device, dtype=dtype)
    raise ValueError(f"norm must be None or 'batch', got {norm!r}")


# ====================================================================== bilinear
class SPNBilinear(SPNModule):
    """``y = W_c[(W_b b) * (W_a a)]``: a learnable bilinear map with ``rank`` products.

    Args:
        in_a, in_b, out: sizes of the inputs a (..., in_a), b (..., in_b) and output (..., out).
        rank: r, the number of multiplications.
        quantizer: "twn", "fixed" or a :class:`TernaryQuantizer` (for ``"fixed"`` the defaults
            give exact values in {-1, 0, 1}).
    Parameters: ``w_a`` (r, in_a), ``w_b`` (r, in_b), ``w_c`` (out, r).  In phases "ternary_b" the
    encoders ``w_a`` and ``w_b`` are ternary.
    """

    _encoders = ("w_a", "w_b")
    _decoders = ("w_c",)

    def __init__(self, in_a: int, in_b: int, out: int, rank: int, quantizer="twn", device=None, dtype=None):
        super().__init__()
        for n, v in (("in_a", in_a), ("in_b", in_b), ("out", out), ("rank", rank)):
            check_int(n, v)
        self.in_a, self.in_b, self.out, self.rank = in_a, in_b, out, rank
        kw = dict(device=device, dtype=dtype)
        self.w_a = nn.Parameter(torch.randn(rank, in_a, **kw) / math.sqrt(in_a))
        self.w_b = nn.Parameter(torch.randn(rank, in_b, **kw) / math.sqrt(in_b))
        self.w_c = nn.Parameter(torch.randn(out, rank, **kw) / math.sqrt(rank))
        self.norm = None
        self._init_phase(quantizer, device)

    @classmethod
    def from_algorithm(cls, alg, quantizer="fixed", dtype=torch.float32) -> "SPNBilinear":
        """Initialize from a :class:`BilinearAlgorithm` <n,m,p>: a = vec(A) (n*m), b = vec(B) (m*p)."""
        U, V, W = alg.factors(dtype)
        mod = cls(U.shape[0], V.shape[0], W.shape[0], alg.rank, quantizer=quantizer, dtype=dtype)
        with torch.no_grad():
            mod.w_a.copy_(U.T)
            mod.w_b.copy_(V.T)
            mod.w_c.copy_(W)
        return mod

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] != self.in_a or b.shape[-1] != self.in_b:
            raise ValueError(f"expected a (..., {self.in_a}) and b (..., {self.in_b}), got {tuple(a.shape)} and {tuple(b.shape)}")
        return spn_bilinear(a, b, self.effective("w_a"), self.effective("w_b"), self.effective("w_c"))

    def extra_repr(self) -> str:
        return f"in_a={self.in_a}, in_b={self.in_b}, out={self.out}, rank={self.rank}, phase={self.phase!r}"


# ====================================================================== linear
class SPNLinear(SPNModule):
    """``y = W_c[norm(W_b x) * a_hat] + bias``: a drop-in nn.Linear with ``rank`` multiplications per row.

    Args:
        in_features (K), out_features (N): as nn.Linear.  rank: r.
        bias: learn an additive bias (N,).
        norm: None or "batch" (BatchNorm1d without affine parameters on the r hidden units W_b x;
            its scale is absorbed by a_hat).
        quantizer: "twn" (default), "fixed" or a :class:`TernaryQuantizer`.
    Parameters: ``w_b`` (r, K), ``a_hat`` (r,), ``w_c`` (N, r), ``bias`` (N,).
    Input (..., K) -> output (..., N).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, norm=None, quantizer="twn", device=None, dtype=None):
        super().__init__()
        for n, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            check_int(n, v)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(device=device, dtype=dtype)
        self.w_b = nn.Parameter(torch.randn(rank, in_features, **kw) / math.sqrt(in_features))
        self.a_hat = nn.Parameter(torch.ones(rank, **kw))
        self.w_c = nn.Parameter(torch.randn(out_features, rank, **kw) / math.sqrt(rank))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.norm = _make_norm(norm, rank, 1, device, dtype)
        self._init_phase(quantizer, device)

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return z
        shape = z.shape
        return self.norm(z.reshape(-1, shape[-1])).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        w_b, w_c = self.effective("w_b"), self.effective("w_c")
        if self.norm is None:
            return spn_linear(x, w_b, self.a_hat, w_c, self.bias)
        h = self._hidden(x @ w_b.T) * self.a_hat
        y = h @ w_c.T
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, quantizer="twn", seed: int = 0) -> "SPNLinear":
        """Initialize from a dense layer by truncated SVD: W ~= W_c diag(a_hat) W_b.

        Exact (up to rounding) when ``rank >= min(K, N)`` (the default rank is min(K, N)); extra
        hidden units beyond the matrix rank get a_hat = 0 and small random W_b / W_c rows (seeded).
        Normalization is off (an un-calibrated BatchNorm would change the function).
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        N, K = linear.weight.shape
        rank = min(N, K) if rank is None else check_int("rank", rank)
        w = linear.weight.detach()
        mod = cls(K, N, rank, bias=linear.bias is not None, quantizer=quantizer, device=w.device, dtype=w.dtype)
        wb, a, wc = _svd_factors(w.double(), rank, seed)
        with torch.no_grad():
            mod.w_b.copy_(wb)
            mod.a_hat.copy_(a)
            mod.w_c.copy_(wc)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (N, K), bias (N,) or None) of the equivalent dense layer (eval-mode normalization)."""
        w_b, w_c = self.effective("w_b").detach(), self.effective("w_c").detach()
        s, t = self._hidden_norm_scale_shift(self.rank, w_b)
        a = self.a_hat.detach()
        weight = w_c @ ((a * s)[:, None] * w_b)
        shift = w_c @ (a * t)
        if self.bias is not None:
            bias = self.bias.detach() + shift
        else:
            bias = shift if self.norm is not None else None
        return weight, bias

    def to_dense(self) -> nn.Linear:
        """An nn.Linear computing the same function as this layer in eval mode (current phase)."""
        weight, bias = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, norm={'batch' if self.norm is not None else None}, phase={self.phase!r}"
        )


def _svd_factors(w: torch.Tensor, rank: int, seed: int):
    """Rank-``rank`` factors (W_b (rank, K), a (rank,), W_c (N, rank)) of w (N, K) in w's dtype order."""
    N, K = w.shape
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank, S.numel())
    gen = torch.Generator().manual_seed(seed)
    wb = torch.randn(rank, K, generator=gen, dtype=w.dtype) * (0.1 / math.sqrt(K))
    wc = torch.randn(N, rank, generator=gen, dtype=w.dtype) * (0.1 / math.sqrt(rank))
    a = torch.zeros(rank, dtype=w.dtype)
    wb[:k] = Vh[:k]
    wc[:, :k] = U[:, :k]
    a[:k] = S[:k]
    return wb, a, wc


# ====================================================================== conv2d
def _padding4(padding, kernel, stride) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding from an nn.Conv2d-style padding argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is only supported with stride 1 (as in nn.Conv2d)")
            th, tw = kernel[0] - 1, kernel[1] - 1
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return (ph, ph, pw, pw)


class SPNConv2d(SPNModule):
    """StrassenNets convolution: each p x p output patch from its ((p-1)s+k)-sized input window.

    ``W_b`` is a convolution with kernel (p-1)s+k and stride p*s (groups g) to ``rank`` channels,
    the result is (optionally normalized and) multiplied channel-wise by ``a_hat``, and ``W_c`` is a
    transposed convolution with kernel p and stride p (groups g) back to ``out_channels``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, groups, bias: as nn.Conv2d (zero
            padding; int, pair, "valid" or "same"; dilation 1).
        rank: r, hidden channels (multiplications per output patch); must be divisible by groups.
        out_patch: p (int or pair), the output patch computed from one window.
        norm: None or "batch" (BatchNorm2d without affine on the r hidden channels).
        quantizer: "twn", "fixed" or a :class:`TernaryQuantizer`.
    Parameters: ``w_b`` (r, C_in/g, win_h, win_w), ``a_hat`` (r,), ``w_c`` (r, C_out/g, p_h, p_w), ``bias``.
    Input (B, C_in, H, W) -> output (B, C_out, H_out, W_out) with H_out, W_out exactly as nn.Conv2d.
    The multiplication reduction factor vs the dense conv is C_in*C_out*k_h*k_w*p_h*p_w / (g*r).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        rank: int | None = None,
        out_patch=1,
        groups: int = 1,
        bias: bool = True,
        norm=None,
        quantizer="twn",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank is None:
            raise ValueError("rank is required: the number of hidden channels (multiplications per output patch)")
        for n, v in (("in_channels", in_channels), ("out_channels", out_channels), ("rank", rank), ("groups", groups)):
            check_int(n, v)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.out_patch = pair(out_patch, "out_patch")
        for n, v in (("kernel_size", self.kernel_size), ("stride", self.stride), ("out_patch", self.out_patch)):
            if min(v) < 1:
                raise ValueError(f"{n} must be >= 1, got {v}")
        for n, v in (("in_channels", in_channels), ("out_channels", out_channels), ("rank", rank)):
            if v % groups:
                raise ValueError(f"{n}={v} must be divisible by groups={groups}")
        self.padding = padding
        self._pad4 = _padding4(padding, self.kernel_size, self.stride)
        self.in_channels, self.out_channels, self.rank, self.groups = in_channels, out_channels, rank, groups
        (kh, kw), (sh, sw), (qh, qw) = self.kernel_size, self.stride, self.out_patch
        self.window = ((qh - 1) * sh + kh, (qw - 1) * sw + kw)
        kw_ = dict(device=device, dtype=dtype)
        fan_b = in_channels // groups * self.window[0] * self.window[1]
        self.w_b = nn.Parameter(torch.randn(rank, in_channels // groups, *self.window, **kw_) / math.sqrt(fan_b))
        self.a_hat = nn.Parameter(torch.ones(rank, **kw_))
        # hidden units have ~unit variance for unit-variance inputs; each output sums r/g of them
        self.w_c = nn.Parameter(torch.randn(rank, out_channels // groups, qh, qw, **kw_) / math.sqrt(rank // groups))
        self.bias = nn.Parameter(torch.zeros(out_channels, **kw_)) if bias else None
        self.norm = _make_norm(norm, rank, 2, device, dtype)
        self._init_phase(quantizer, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return spn_conv2d(
            x, self.effective("w_b"), self.a_hat, self.effective("w_c"), self.bias,
            self.kernel_size, self.stride, self._pad4, self.out_patch, self.groups,
            hidden_fn=self.norm,
        )

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        g = spn_conv_geometry(h, w, self.kernel_size, self.stride, self._pad4, self.out_patch)
        return g["out_h"], g["out_w"]

    @property
    def mult_reduction(self) -> float:
        """C_in * C_out * k_h * k_w * p_h * p_w / (groups * r): dense multiplications per patch / r."""
        (kh, kw), (qh, qw) = self.kernel_size, self.out_patch
        return self.in_channels * self.out_channels * kh * kw * qh * qw / (self.groups * self.rank)

    # ------------------------------------------------------------ dense equivalents
    def _patch_matrices(self) -> torch.Tensor:
        """Effective dense map of one patch per group: (g, C_out/g * p_h * p_w, C_in/g * win_h * win_w)
        in eval mode (normalization folded), plus the constant shift (C_out,) from the normalization."""
        g, r = self.groups, self.rank
        rg = r // g
        w_b, w_c = self.effective("w_b").detach(), self.effective("w_c").detach()
        s, t = self._hidden_norm_scale_shift(r, w_b)
        a = self.a_hat.detach()
        B = (w_b.reshape(r, -1) * (a * s)[:, None]).reshape(g, rg, -1)  # (g, rg, cin_g*win)
        C = w_c.reshape(g, rg, -1).transpose(1, 2)  # (g, og*qh*qw, rg)
        M = C @ B
        shift = (C @ (a * t).reshape(g, rg, 1)).reshape(g, -1, *self.out_patch)  # (g, og, qh, qw)
        return M, shift.reshape(self.out_channels, *self.out_patch)

    def to_dense(self, atol: float = 1e-6) -> nn.Module:
        """A dense module computing this layer's function (eval mode, current phase).

        Returns an ``nn.Conv2d`` (same kernel/stride/padding/groups) when the layer is one: always for
        out_patch 1, and for larger patches when every patch position uses the same k x k kernel
        shifted by its stride (checked to ``atol`` relative to the largest entry).  Otherwise the
        layer is a patch-periodic convolution and a :class:`DensePatchConv2d` (exact) is returned.
        """
        M, shift = self._patch_matrices()
        g = self.groups
        og, cg = self.out_channels // g, self.in_channels // g
        (kh, kw), (sh, sw), (qh, qw) = self.kernel_size, self.stride, self.out_patch
        wh, ww = self.window
        P = M.reshape(g, og, qh, qw, cg, wh, ww)
        kernel = P[:, :, 0, 0, :, :kh, :kw]  # (g, og, cg, kh, kw)
        recon = torch.zeros_like(P)
        for u in range(qh):
            for v in range(qw):
                recon[:, :, u, v, :, u * sh : u * sh + kh, v * sw : v * sw + kw] = kernel
        tol = atol * max(float(P.abs().max()), 1e-30)
        shift_ok = bool((shift - shift[:, :1, :1]).abs().max() <= atol * max(float(shift.abs().max()), 1e-30))
        if (recon - P).abs().max() <= tol and shift_ok:
            conv = nn.Conv2d(
                self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                groups=g, bias=self.bias is not None or self.norm is not None, device=M.device, dtype=M.dtype,
            )
            with torch.no_grad():
                conv.weight.copy_(kernel.reshape(self.out_channels, cg, kh, kw))
                if conv.bias is not None:
                    b = shift[:, 0, 0].clone()
                    if self.bias is not None:
                        b += self.bias.detach()
                    conv.bias.copy_(b)
            return conv
        bias = shift.clone()
        if self.bias is not None:
            bias += self.bias.detach().view(-1, 1, 1)
        return DensePatchConv2d(M.reshape(self.out_channels * qh * qw, cg, wh, ww), bias, self.kernel_size, self.stride, self._pad4, self.out_patch, g)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, rank: int | None = None, out_patch=1, norm=None, quantizer="twn", seed: int = 0) -> "SPNConv2d":
        """Initialize from a dense nn.Conv2d by truncated SVD of its per-patch dense map (per group).

        The patch map sends a ((p-1)s+k)^2 window to the p x p outputs it determines. It is exact
        (up to rounding) when ``rank/groups >= min(C_out/g * p^2, C_in/g * window^2)`` - the default
        rank.  Zero-padding modes other than "zeros" and dilation != 1 are not supported.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.dilation != (1, 1):
            raise ValueError(f"dilation must be 1, got {conv.dilation}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        g = conv.groups
        og, cg = conv.out_channels // g, conv.in_channels // g
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        qh, qw = pair(out_patch, "out_patch")
        wh, ww = (qh - 1) * sh + kh, (qw - 1) * sw + kw
        full_rg = min(og * qh * qw, cg * wh * ww)
        rank = g * full_rg if rank is None else check_int("rank", rank)
        if rank % g:
            raise ValueError(f"rank={rank} must be divisible by groups={g}")
        w = conv.weight.detach()
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, rank=rank,
                  out_patch=(qh, qw), groups=g, bias=conv.bias is not None, norm=norm, quantizer=quantizer,
                  device=w.device, dtype=w.dtype)
        W = w.double().reshape(g, og, cg, kh, kw)
        P = torch.zeros(g, og, qh, qw, cg, wh, ww, dtype=torch.float64)
        for u in range(qh):
            for v in range(qw):
                P[:, :, u, v, :, u * sh : u * sh + kh, v * sw : v * sw + kw] = W
        M = P.reshape(g, og * qh * qw, cg * wh * ww)
        rg = rank // g
        wbs, as_, wcs = [], [], []
        for gi in range(g):
            wb, a, wc = _svd_factors(M[gi], rg, seed + gi)
            wbs.append(wb)
            as_.append(a)
            wcs.append(wc.T.reshape(rg, og, qh, qw))
        with torch.no_grad():
            mod.w_b.copy_(torch.cat(wbs).reshape(rank, cg, wh, ww))
            mod.a_hat.copy_(torch.cat(as_))
            mod.w_c.copy_(torch.cat(wcs))
            if conv.bias is not None:
                mod.bias.copy_(conv.bias.detach())
        return mod

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, rank={self.rank}, out_patch={self.out_patch}, groups={self.groups}, "
            f"bias={self.bias is not None}, phase={self.phase!r}, mult_reduction={self.mult_reduction:.2f}"
        )


class DensePatchConv2d(nn.Module):
    """Exact dense form of an SPNConv2d whose patch positions use different kernels.

    A grouped conv with kernel ((p-1)s+k) and stride p*s to C_out*p_h*p_w channels (channel
    o*p_h*p_w + u*p_w + v is output channel o at patch position (u, v)), rearranged into patches and
    cropped to nn.Conv2d's output size.  ``weight``: (C_out*p_h*p_w, C_in/g, win_h, win_w);
    ``bias``: (C_out, p_h, p_w) (a per-patch-position bias).
    """

    def __init__(self, weight, bias, kernel_size, stride, pad4, out_patch, groups):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.kernel_size, self.stride, self.pad4, self.out_patch, self.groups = kernel_size, stride, pad4, out_patch, groups

    def forward(self, x):
        g = spn_conv_geometry(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.pad4, self.out_patch)
        pt, pb, pl, pr = self.pad4
        (qh, qw), (sh, sw) = self.out_patch, self.stride
        xp = F.pad(x, (pl, pr + g["extra_w"], pt, pb + g["extra_h"]))[:, :, : g["need_h"], : g["need_w"]]
        y = F.conv2d(xp, self.weight, None, stride=(qh * sh, qw * sw), groups=self.groups)
        B = y.shape[0]
        c_out = self.bias.shape[0]
        y = y.reshape(B, c_out, qh, qw, g["ph"], g["pw"]) + self.bias.view(1, c_out, qh, qw, 1, 1)
        y = y.permute(0, 1, 4, 2, 5, 3).reshape(B, c_out, g["ph"] * qh, g["pw"] * qw)
        return y[:, :, : g["out_h"], : g["out_w"]]
