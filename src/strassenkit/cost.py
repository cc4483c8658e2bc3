"""Cost accounting: multiply-accumulates, multiplications, additions and parameters.

``cost.count(model, *example_inputs)`` runs one forward pass with hooks and returns a
:class:`CostReport` with one :class:`LayerCost` row per counted module. It reads layers and never
changes them.

Two views of the same work are reported:
- ``macs_*``: multiply-accumulates as the implementation executes them (dense encoders/decoders);
  2 * macs is what ``torch.utils.flop_counter.FlopCounterMode`` reports for the same run.
- ``mults`` / ``adds``: the arithmetic an ideal implementation needs when coefficients in {-1, 0, 1}
  cost no multiplication and zeros cost nothing (an encoder with entries in {-1, 0, 1} is additions only).

Support for a module type is added with ``@register_counter(ModuleType)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .nn import SPNBilinear, SPNConv2d, SPNLinear, SPNModule, STLinear
from .nn.stlinear import dense_weight_of, is_linear_like

__all__ = ["LayerCost", "CostReport", "count", "register_counter", "counter_for", "matrix_op_cost"]


@dataclass
class LayerCost:
    """Cost of one module for one forward pass. ``macs_*`` are executed MACs (dense)."""

    name: str
    kind: str
    macs_core: int = 0
    macs_encode: int = 0
    macs_decode: int = 0
    mults: int = 0
    adds: int = 0
    params: int = 0
    dense_macs: int = 0  # MACs of the dense layer this one replaces (for reduction factors)
    extra: dict = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return self.macs_core + self.macs_encode + self.macs_decode

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass
class CostReport:
    layers: list[LayerCost]

    def total(self, attr: str) -> int:
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def macs(self) -> int:
        return self.total("macs")

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def dense_macs(self) -> int:
        return self.total("dense_macs")

    def summary(self) -> dict:
        keys = ["macs_core", "macs_encode", "macs_decode", "mults", "adds", "params", "dense_macs"]
        out = {k: self.total(k) for k in keys}
        out["macs"] = self.macs
        out["flops"] = self.flops
        out["flop_reduction_vs_dense"] = self.dense_macs / self.macs if self.macs else float("nan")
        return out

    def to_json(self) -> str:
        rows = [dict(asdict(layer), macs=layer.macs) for layer in self.layers]
        return json.dumps({"layers": rows, "total": self.summary()}, indent=2)

    def table(self) -> str:
        head = f"{'layer':<32} {'kind':<10} {'MACs core':>12} {'enc':>10} {'dec':>10} {'mults':>12} {'adds':>12} {'params':>10}"
        lines = [head, "-" * len(head)]
        for c in self.layers:
            lines.append(
                f"{c.name[:32]:<32} {c.kind:<10} {c.macs_core:>12,} {c.macs_encode:>10,} {c.macs_decode:>10,} "
                f"{c.mults:>12,} {c.adds:>12,} {c.params:>10,}"
            )
        s = self.summary()
        lines.append(
            f"{'total':<32} {'':<10} {s['macs_core']:>12,} {s['macs_encode']:>10,} {s['macs_decode']:>10,} "
            f"{s['mults']:>12,} {s['adds']:>12,} {s['params']:>10,}"
        )
        return "\n".join(lines)


_COUNTERS: dict[type, Callable] = {}


def register_counter(module_type: type):
    """Decorator: fn(module, inputs: tuple, output) -> LayerCost (name is filled in by ``count``)."""

    def deco(fn):
        _COUNTERS[module_type] = fn
        return fn

    return deco


def counter_for(module: nn.Module):
    """The registered cost counter for ``module``'s type (or a base class), or None.

    transformers' Conv1D (not imported here) counts as the linear layer it is.
    """
    for klass in type(module).__mro__:
        if klass in _COUNTERS:
            return _COUNTERS[klass]
    if is_linear_like(module):
        return _linear_cost
    return None


def count(model: nn.Module, *example_inputs, **example_kwargs) -> CostReport:
    """Run ``model(*example_inputs)`` under no_grad with hooks; one row per supported leaf module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count(model, *example_inputs): model must be an nn.Module, got {type(model).__name__}")
    rows: list[LayerCost] = []
    handles = []

    def make_hook(name, fn):
        def hook(module, inputs, output):
            c = fn(module, inputs, output)
            c.name = name or type(module).__name__
            rows.append(c)

        return hook

    for name, module in model.named_modules():
        fn = counter_for(module)
        if fn is not None:
            handles.append(module.register_forward_hook(make_hook(name, fn)))
    try:
        with torch.no_grad():
            model(*example_inputs, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
    return CostReport(rows)


# ------------------------------------------------------------------ helpers
def matrix_op_cost(mat: torch.Tensor, applications: int) -> tuple[int, int]:
    """(mults, adds) of applying the linear map ``mat`` (out x in) ``applications`` times.

    Zeros cost nothing, entries +-1 cost no multiplication, every output needs (nnz_row - 1) additions.
    """
    m = mat.detach()
    nz = m != 0
    nnz_rows = nz.sum(dim=1)
    mults = int((nz & (m.abs() != 1)).sum())
    adds = int((nnz_rows - 1).clamp(min=0).sum())
    return mults * applications, adds * applications


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


# ------------------------------------------------------------------ counters
@register_counter(nn.Linear)
def _linear_cost(module: nn.Module, inputs, output) -> LayerCost:
    """nn.Linear, and transformers' Conv1D (weight (in, out)), which counter_for maps here by shape."""
    rows = _rows(inputs[0])
    N, K = dense_weight_of(module).shape
    macs = rows * K * N
    adds = rows * (K - 1) * N + (rows * N if module.bias is not None else 0)
    return LayerCost("", "linear", macs_core=macs, mults=macs, adds=adds, params=_params(module), dense_macs=macs)


@register_counter(STLinear)
def _stlinear_cost(module: STLinear, inputs, output) -> LayerCost:
    x = inputs[0]
    n, m, p = module.format
    r = module.rank
    K, N = module.in_features, module.out_features
    L = x.shape[-2] if x.dim() >= 2 else 1
    B = x.numel() // (L * K)
    Mt, Kt, Nt = math.ceil(L / n), math.ceil(K / m), math.ceil(N / p)
    x_tiles, y_tiles = B * Mt * Kt, B * Mt * Nt
    core = r * (B * Mt) * Kt * Nt
    enc = r * (n * m) * x_tiles
    dec = (n * p) * r * y_tiles
    emul, eadd = matrix_op_cost(module.enc_x, x_tiles)
    dmul, dadd = matrix_op_cost(module.dec, y_tiles)
    core_adds = r * (B * Mt) * (Kt - 1) * Nt
    bias_adds = B * L * N if module.bias is not None else 0
    return LayerCost(
        "", "stl", macs_core=core, macs_encode=enc, macs_decode=dec,
        mults=core + emul + dmul, adds=core_adds + eadd + dadd + bias_adds,
        params=sum(p.numel() for p in (module.w_hat, module.enc_x, module.dec)) + (N if module.bias is not None else 0),
        dense_macs=B * L * K * N,
        extra={"tile": module.tile, "row_tile": n, "rank": r, "padded_rows": B * (Mt * n - L)},
    )


@register_counter(nn.Conv2d)
def _conv2d_cost(module: nn.Conv2d, inputs, output) -> LayerCost:
    kh, kw = module.kernel_size
    per_out = (module.in_channels // module.groups) * kh * kw
    outs = output.numel()
    macs = outs * per_out
    adds = outs * (per_out - 1) + (outs if module.bias is not None else 0)
    return LayerCost("", "conv2d", macs_core=macs, mults=macs, adds=adds, params=_params(module), dense_macs=macs)


# ------------------------------------------------------------------ StrassenNets (SPN) counters
# mults / adds of an SPN layer in its current phase:
# - a ternary matrix (phases "ternary*", "frozen") costs additions only: (nnz_row - 1) per output row;
#   a full-precision one is counted by matrix_op_cost (entries other than 0, +-1 cost a multiplication);
# - the hidden product with a_hat: r multiplications per position (row / output patch);
# - scales: per-tensor scales (and the per-unit scale of an eval-mode normalization) are folded into
#   a_hat once per forward pass (r multiplications each, independent of the batch); a per-channel
#   decoder scale multiplies every output (N per position); the normalization shift adds r per position.


def _spn_matrix(module: SPNModule, name: str, rows_first) -> tuple[torch.Tensor, list]:
    """(matrix as counted, list of scale tensors that must be applied) for matrix ``name``."""
    if module.is_quantized(name):
        t, s = module.ternary_parts(name)
        return rows_first(t.to(torch.float32)), [s]
    return rows_first(getattr(module, name).detach()), []


def _spn_scale_mults(module: SPNModule, scales_enc: list, scales_dec: list, r: int, n_out: int, positions: int,
                     dec_scale_per_hidden: bool = False) -> int:
    """Scale multiplications: encoder scales (per tensor or per hidden unit) fold into a_hat (r once);
    so does a per-tensor decoder scale, or a per-hidden-unit one (SPNConv2d's w_c dim 0 is the hidden
    unit); a per-output decoder scale costs n_out per position."""
    mults = 0
    for s in scales_enc:
        if not bool((s == 1).all()):
            mults += r
    for s in scales_dec:
        if bool((s == 1).all()):
            continue
        mults += r if (s.numel() == 1 or dec_scale_per_hidden) else n_out * positions
    if getattr(module, "norm", None) is not None:
        mults += r
    return mults


@register_counter(SPNLinear)
def _spn_linear_cost(module: SPNLinear, inputs, output) -> LayerCost:
    x = inputs[0]
    rows = _rows(x)
    K, N, r = module.in_features, module.out_features, module.rank
    wb, sb = _spn_matrix(module, "w_b", lambda t: t)
    wc, sc = _spn_matrix(module, "w_c", lambda t: t)
    bmul, badd = matrix_op_cost(wb, rows)
    cmul, cadd = matrix_op_cost(wc, rows)
    scale = _spn_scale_mults(module, sb, sc, r, N, rows)
    norm_adds = r * rows if module.norm is not None else 0
    bias_adds = N * rows if module.bias is not None else 0
    return LayerCost(
        "", "spn_linear", macs_core=r * rows, macs_encode=r * K * rows, macs_decode=N * r * rows,
        mults=r * rows + bmul + cmul + scale, adds=badd + cadd + norm_adds + bias_adds,
        params=sum(p.numel() for p in module.parameters(recurse=False)), dense_macs=K * N * rows,
        extra={"rank": r, "phase": module.phase, "mult_reduction": K * N / r, "scale_mults": scale},
    )


@register_counter(SPNConv2d)
def _spn_conv2d_cost(module: SPNConv2d, inputs, output) -> LayerCost:
    x = inputs[0]
    from .functional.spn import spn_conv_geometry

    geo = spn_conv_geometry(x.shape[2], x.shape[3], module.kernel_size, module.stride, module._pad4, module.out_patch)
    patches = x.shape[0] * geo["ph"] * geo["pw"]
    g, r = module.groups, module.rank
    rg, og = r // g, module.out_channels // g
    (kh, kw), (qh, qw) = module.kernel_size, module.out_patch
    cin_g = module.in_channels // g
    wb, sb = _spn_matrix(module, "w_b", lambda t: t.reshape(r, -1))
    # decoder as a matrix: one row per (output channel, patch position) over the r/g hidden units of its group
    wc, sc = _spn_matrix(module, "w_c", lambda t: t.reshape(g, rg, og * qh * qw).transpose(1, 2).reshape(g * og * qh * qw, rg))
    bmul, badd = matrix_op_cost(wb, patches)
    cmul, cadd = matrix_op_cost(wc, patches)
    scale = _spn_scale_mults(module, sb, sc, r, module.out_channels * qh * qw, patches, dec_scale_per_hidden=True)
    norm_adds = r * patches if module.norm is not None else 0
    outs = output.numel()
    bias_adds = outs if module.bias is not None else 0
    win = module.window[0] * module.window[1]
    return LayerCost(
        "", "spn_conv2d", macs_core=r * patches, macs_encode=r * cin_g * win * patches,
        macs_decode=module.out_channels * qh * qw * rg * patches,
        mults=r * patches + bmul + cmul + scale, adds=badd + cadd + norm_adds + bias_adds,
        params=sum(p.numel() for p in module.parameters(recurse=False)),
        dense_macs=outs * cin_g * kh * kw,
        extra={"rank": r, "phase": module.phase, "patches": patches, "out_patch": module.out_patch,
               "mult_reduction": module.mult_reduction, "scale_mults": scale},
    )


@register_counter(SPNBilinear)
def _spn_bilinear_cost(module: SPNBilinear, inputs, output) -> LayerCost:
    rows = output.numel() // module.out
    r = module.rank
    wa, sa = _spn_matrix(module, "w_a", lambda t: t)
    wb, sb = _spn_matrix(module, "w_b", lambda t: t)
    wc, sc = _spn_matrix(module, "w_c", lambda t: t)
    costs = [matrix_op_cost(m, rows) for m in (wa, wb, wc)]
    scale = _spn_scale_mults(module, sa + sb, sc, r, module.out, rows)
    return LayerCost(
        "", "spn_bilinear", macs_core=r * rows, macs_encode=r * (module.in_a + module.in_b) * rows,
        macs_decode=module.out * r * rows,
        mults=r * rows + sum(c[0] for c in costs) + scale, adds=sum(c[1] for c in costs),
        params=sum(p.numel() for p in module.parameters(recurse=False)),
        extra={"rank": r, "phase": module.phase, "scale_mults": scale},
    )
