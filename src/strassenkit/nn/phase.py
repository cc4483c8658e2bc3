"""Training phases of StrassenNets layers and export of their ternary matrices.

The paper trains in phases: a full-precision SPN, then ternary W_b and W_c (optionally one at a
time), then the ternary matrices frozen while only a_hat, the normalization and the bias train.
``set_phase(model, phase)`` switches every SPN layer of a model. Each layer's forward pass reads the
phase from a Python attribute (no host sync, compiles with ``fullgraph=True``); it is mirrored in the
persistent ``spn_phase`` buffer, so it is saved and restored by ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from .spn import PHASES, SPNModule

__all__ = ["PHASES", "set_phase", "get_phases", "export_ternary", "import_ternary"]


def _spn_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SPNModule)]


def set_phase(model: nn.Module, phase: str) -> int:
    """Set ``phase`` (one of "full", "ternary", "ternary_b", "ternary_c", "frozen") on every SPN layer.

    In "frozen" the ternary matrices get ``requires_grad=False`` (and the forward pass detaches them,
    so they stay fixed even if an optimizer holds them). Returns the number of layers switched;
    raises ValueError when the model has no SPN layer or the phase is unknown.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    mods = _spn_modules(model)
    if not mods:
        raise ValueError("model contains no SPN layer (SPNBilinear / SPNLinear / SPNConv2d)")
    for _, m in mods:
        m.set_phase(phase)
    return len(mods)


def get_phases(model: nn.Module) -> dict[str, str]:
    """{layer name: phase} for every SPN layer."""
    return {name: m.phase for name, m in _spn_modules(model)}


def export_ternary(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Ternary matrices of every SPN layer as int8 values plus scales.

    Returns ``{"<layer>.<matrix>": {"values": int8 tensor in {-1,0,1}, "scale": float tensor}}`` for
    every ternary matrix (``w_b``, ``w_c`` and ``w_a`` for SPNBilinear), whatever the current phase;
    ``values * scale`` is exactly what the layer uses in the ternary phases.
    """
    out = {}
    for name, m in _spn_modules(model):
        for mat in m.ternary_names():
            values, scale = m.ternary_parts(mat)
            out[f"{name}.{mat}" if name else mat] = {"values": values.clone(), "scale": scale.clone()}
    return out


def import_ternary(model: nn.Module, exported: dict[str, dict[str, torch.Tensor]], strict: bool = True) -> None:
    """Load :func:`export_ternary` output: each shadow matrix is set to ``values * scale``.

    The layers' quantizers then reproduce exactly those ternary matrices (TWN: the threshold
    0.7*mean|w| is below the scale; "fixed": the quantizer's own scale is used and must exceed its
    threshold). ``strict`` raises on missing or unexpected keys.
    """
    mods = dict(_spn_modules(model))
    seen = set()
    for key, entry in exported.items():
        layer, _, mat = key.rpartition(".")
        if layer not in mods or mat not in mods[layer].ternary_names():
            if strict:
                raise KeyError(f"{key!r} is not a ternary matrix of an SPN layer in this model")
            continue
        m = mods[layer]
        values = entry["values"]
        if values.dtype != torch.int8 or not bool(((values >= -1) & (values <= 1)).all()):
            raise ValueError(f"{key}: values must be an int8 tensor with entries in {{-1, 0, 1}}")
        param = getattr(m, mat)
        if values.shape != param.shape:
            raise ValueError(f"{key}: values have shape {tuple(values.shape)}, the layer expects {tuple(param.shape)}")
        scale = entry["scale"]
        if m.quantizer.mode == "fixed":
            scale = torch.tensor(m.quantizer.scale)
        with torch.no_grad():
            param.copy_(values.to(param.dtype) * scale.to(param.dtype))
        seen.add(key)
    if strict:
        missing = {f"{n}.{mat}" if n else mat for n, m in mods.items() for mat in m.ternary_names()} - seen
        if missing:
            raise KeyError(f"missing ternary matrices: {sorted(missing)}")
