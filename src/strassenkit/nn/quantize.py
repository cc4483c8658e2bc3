"""Ternary quantizers with straight-through gradients.

Two quantizers map a full-precision "shadow" weight ``w`` to ``scale * t`` with ``t`` in {-1, 0, 1}:

- fixed threshold: ``t = sign(w) * (|w| > threshold)`` with a given ``scale`` (default 1; with
  ``threshold=0.5, scale=1`` this is rounding to the nearest of {-1, 0, 1} clipped to [-1, 1]).
- TWN (Li, Zhang, Liu 2016, "Ternary Weight Networks"): ``threshold = 0.7 * mean|w|`` and
  ``scale = mean(|w_i|  for |w_i| > threshold)``.

Both use a straight-through estimator (STE) in the backward pass: the gradient with respect to the
quantized weight is passed unchanged to the shadow weight (optionally zeroed where ``|w| > clip``).
The quantized value is ``scale * t``; :func:`ternary_parts` gives ``(t as int8, scale)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ternarize_fixed",
    "ternarize_twn",
    "twn_threshold_scale",
    "ternary_parts",
    "TernaryQuantizer",
]


class _TernarySTE(torch.autograd.Function):
    """forward: scale * sign(w) * (|w| > threshold); backward: straight-through (optionally clipped)."""

    @staticmethod
    def forward(ctx, w, threshold, scale, clip):
        t = torch.sign(w) * (w.abs() > threshold).to(w.dtype)
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(w)
        return t * scale

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip is not None:
            (w,) = ctx.saved_tensors
            grad = grad * (w.abs() <= ctx.clip).to(grad.dtype)
        return grad, None, None, None


def _check_positive(v, name):
    if isinstance(v, torch.Tensor):
        if (v < 0).any():
            raise ValueError(f"{name} must be >= 0")
        return v
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    return float(v)


def ternarize_fixed(w: torch.Tensor, threshold: float = 0.5, scale: float = 1.0, clip: float | None = None) -> torch.Tensor:
    """``scale * sign(w) * (|w| > threshold)`` (same shape as ``w``) with a straight-through gradient.

    Args:
        w: any shape.  threshold: >= 0.  scale: >= 0 (a float or a tensor broadcastable to ``w``).
        clip: if given, the STE gradient is zeroed where ``|w| > clip`` (the clipped STE).
    """
    threshold = _check_positive(threshold, "threshold")
    scale = _check_positive(scale, "scale")
    return _TernarySTE.apply(w, threshold, scale, clip)


def twn_threshold_scale(w: torch.Tensor, dim=None) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN threshold ``0.7 * mean|w|`` and scale ``mean(|w_i|, |w_i| > threshold)`` (no gradient).

    ``dim=None`` gives one (threshold, scale) per tensor; ``dim=0`` one per slice along dim 0
    (returned with shape broadcastable to ``w``).  A slice whose entries are all zero gets scale 0.
    """
    a = w.detach().abs()
    if dim is None:
        delta = 0.7 * a.mean()
        mask = (a > delta).to(a.dtype)
        scale = (a * mask).sum() / mask.sum().clamp(min=1)
        return delta, scale
    if dim != 0:
        raise ValueError(f"dim must be None (per tensor) or 0 (per output slice), got {dim!r}")
    flat = a.reshape(a.shape[0], -1)
    delta = 0.7 * flat.mean(dim=1, keepdim=True)
    mask = (flat > delta).to(a.dtype)
    scale = (flat * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    shape = (a.shape[0],) + (1,) * (a.dim() - 1)
    return delta.view(shape), scale.view(shape)


def ternarize_twn(w: torch.Tensor, dim=None, clip: float | None = None) -> torch.Tensor:
    """TWN ternarization ``scale * sign(w) * (|w| > 0.7 mean|w|)`` with a straight-through gradient.

    The threshold and scale are computed from ``w`` without gradient (as in TWN); the STE passes the
    gradient of the quantized weight to ``w`` unchanged.
    """
    delta, scale = twn_threshold_scale(w, dim)
    return _TernarySTE.apply(w, delta, scale, clip)


def ternary_parts(w: torch.Tensor, mode: str = "twn", threshold: float = 0.5, scale: float = 1.0, dim=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer part and scale of a quantized weight: ``(t: int8 tensor like w, scale: float tensor)``.

    ``scale * t.float()`` equals the quantizer's output exactly.
    """
    w = w.detach()
    if mode == "twn":
        delta, s = twn_threshold_scale(w, dim)
    elif mode == "fixed":
        delta, s = torch.tensor(threshold, dtype=w.dtype), torch.tensor(scale, dtype=w.dtype)
    else:
        raise ValueError(f"mode must be 'twn' or 'fixed', got {mode!r}")
    t = (torch.sign(w) * (w.abs() > delta)).to(torch.int8)
    return t, torch.as_tensor(s, dtype=w.dtype).clone()


class TernaryQuantizer(nn.Module):
    """Module form of the quantizers: ``TernaryQuantizer("twn")(w)`` or ``("fixed", threshold, scale)``.

    Args:
        mode: "twn" (threshold 0.7 mean|w|, scale = mean of |w| above it) or "fixed".
        threshold, scale: used by "fixed".
        per_channel: TWN threshold/scale per slice along dim 0 instead of per tensor.
        clip: clipped STE (zero gradient where |w| > clip); None = plain STE.
    """

    def __init__(self, mode: str = "twn", threshold: float = 0.5, scale: float = 1.0, per_channel: bool = False, clip: float | None = None):
        super().__init__()
        if mode not in ("twn", "fixed"):
            raise ValueError(f"mode must be 'twn' or 'fixed', got {mode!r}")
        self.mode = mode
        self.threshold = _check_positive(threshold, "threshold")
        self.scale = _check_positive(scale, "scale")
        if mode == "fixed" and self.scale <= self.threshold:
            # values scale*{-1,0,1} must quantize to themselves (export/import round trip)
            raise ValueError(f"fixed quantizer needs scale > threshold, got scale={scale}, threshold={threshold}")
        self.per_channel = bool(per_channel)
        self.clip = clip

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "twn":
            return ternarize_twn(w, 0 if self.per_channel else None, self.clip)
        return ternarize_fixed(w, self.threshold, self.scale, self.clip)

    def parts(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 values, scale) of ``self(w)``."""
        return ternary_parts(w, self.mode, self.threshold, self.scale, 0 if self.per_channel else None)

    def extra_repr(self) -> str:
        if self.mode == "twn":
            return f"mode='twn', per_channel={self.per_channel}"
        return f"mode='fixed', threshold={self.threshold}, scale={self.scale}"
