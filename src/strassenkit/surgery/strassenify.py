"""Model surgery: convert the layers of a user's model in place, dry runs, and back to dense.

``strassenify_(model, config, targets="all-linear", exclude=None, causal=None, head="auto", filter_fn=None)``

Which modules are matched (targets, exclude, filter_fn, the output head) is decided by
:func:`strassenkit.surgery.targets.plan_targets`; what they become by the transform registered beside each
config (:mod:`strassenkit.surgery.config`).

**Causal models.** An STL tile with ``row_tile > 1`` mixes ``row_tile`` consecutive rows (tokens) of
a sample, so in an autoregressive model earlier positions would see later ones. With
``causal=True``, or by default when the model looks causal (:func:`.targets.detect_causal`: causal LM
classes, config flags, attention modules with ``is_causal=True``; an unclear Hugging Face model counts
as causal, with a warning), every STLConfig with ``row_tile=None`` is converted with ``row_tile=1`` and
one with ``row_tile > 1`` raises ValueError. ``causal=False`` is the user's word that it is not.

**Padding.** When a layer with ``row_tile > 1`` was converted and the model's ``forward`` takes an
``attention_mask``, a hook on the model makes every STL layer zero the padding rows of its input
(:mod:`strassenkit.nn.padding`), so padding never shares a tile with real tokens.

No half-converted model: every replacement is planned and built first; the model is changed only
after all of them were built. Unsupported module types named by ``targets`` are skipped with a
warning that says why; a call that matches nothing warns.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.stlinear import dense_weight_of, is_linear_like
from .config import transform_for
from . import record
from .targets import TargetRow, plan_targets, resolve_causal

__all__ = ["strassenify_", "inspect_targets", "densify_", "unload_", "InspectReport"]


def _build(model, rows) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    aliases = _aliases(model)
    new = {}
    for row in rows:
        if row.status != "convert":
            continue
        cfg = row.target
        try:
            new[row.name] = transform_for(cfg)(mods[row.name], cfg, row.name)
        except Exception as e:
            raise type(e)(f"converting {row.name} ({row.module_type} {row.shape}) with {cfg!r} failed: {e}; "
                          f"the model was not changed") from e
        row.new_type = type(new[row.name]).__name__
        others = [a for a in aliases.get(id(mods[row.name]), []) if a != row.name]
        if others:
            row.reason = f"one module registered under {[row.name, *others]}: converted once, stays shared"
    return new


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every name it is registered under} (a shared module has several)."""
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n:
            out.setdefault(id(m), []).append(n)
    return out


def _no_fused_fast_path(module, args):  # a forward pre-hook that does nothing (see _keep_off_fused_paths)
    return None


def _keep_off_fused_paths(model: nn.Module, names) -> None:
    """Keep torch's fused transformer kernels off converted layers (they read ``linear1.weight`` directly).

    ``nn.TransformerEncoderLayer`` in eval mode skips its fused path when a submodule has a forward hook,
    so converted (non-Linear) children get a no-op pre-hook; an ``nn.TransformerEncoder`` above them gets
    ``use_nested_tensor = False`` (its nested-tensor path reads the first layer's weights too).
    """
    names = set(names)
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.TransformerEncoderLayer):
            for cname, child in parent.named_children():
                full = f"{pname}.{cname}" if pname else cname
                if (full in names and not isinstance(child, nn.Linear)
                        and _no_fused_fast_path not in child._forward_pre_hooks.values()):
                    child.register_forward_pre_hook(_no_fused_fast_path)
        elif isinstance(parent, nn.TransformerEncoder) and any(n.startswith(f"{pname}.") or not pname for n in names):
            parent.use_nested_tensor = False


def _apply(model: nn.Module, new: dict[str, nn.Module], copy_each: bool = False) -> list[str]:
    """Put every new module in place under each name its old module is registered under; returns the names.

    A module registered under several names (shared) is replaced by one new module everywhere, so it stays shared.
    """
    mods = dict(model.named_modules(remove_duplicate=False))
    aliases = _aliases(model)
    done = []
    for name, mod in new.items():
        mod = copy.deepcopy(mod) if copy_each else mod
        for alias in aliases.get(id(mods[name]), [name]):
            _set_module(model, alias, mod)
            done.append(alias)
    _keep_off_fused_paths(model, done)
    return done


def _warn_rows(rows, converted: int, targets, who: str) -> None:
    for row in rows:
        if row.status == "unsupported":
            warnings.warn(f"{who}: {row.name}: {row.reason}", stacklevel=3)
    if converted == 0:
        warnings.warn(f"{who}: targets={targets!r} matched no convertible module; the model is unchanged", stacklevel=3)


def strassenify_(
    model: nn.Module,
    config=None,
    targets="all-linear",
    exclude=None,
    causal=None,
    head="auto",
    filter_fn=None,
) -> list[str]:
    """Convert the matched modules of ``model`` in place; returns the converted module names.

    ``config``: STLConfig, SPNConfig, a :class:`PerModuleConfig` or a ``{name or "re:<regex>": config
    or None}`` dict. See :mod:`strassenkit.surgery.targets` for ``targets``, ``exclude``, ``head``,
    ``filter_fn(module, fqn) -> bool`` and the causal rule. The model is either fully converted or
    unchanged (an error while building any replacement changes nothing).
    """
    rows = plan_targets(model, config, targets, exclude, causal, head, filter_fn)
    new = _build(model, rows)
    done = _apply(model, new)  # a shared module is converted once and stays shared under all its names
    record.note_conversion(model, rows)
    _warn_rows(rows, len(new), targets if not isinstance(config, dict) else config, "strassenify_")
    return done


# ------------------------------------------------------------------ dry run
@dataclass
class InspectReport:
    """Result of :func:`inspect_targets`: one :class:`TargetRow` per Linear/Conv2d or named module."""

    rows: list[TargetRow]
    causal: bool
    example_error: str = ""

    @property
    def matched(self) -> list[TargetRow]:
        return [r for r in self.rows if r.status == "convert"]

    @property
    def unmatched(self) -> list[TargetRow]:
        return [r for r in self.rows if r.status != "convert"]

    def to_dict(self) -> dict:
        return {"causal": self.causal, "rows": [r.to_dict() for r in self.rows], "example_error": self.example_error}

    def table(self) -> str:
        total = any("dense_macs" in r.cost for r in self.rows)  # example inputs: whole-pass MACs
        unit = "MACs" if total else "MACs/row"
        head = f"{'module':<36} {'type':<10} {'shape':<28} {'status':<12} {unit + ' dense':>14} {unit + ' new':>13}  note"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            dense = r.cost.get("dense_macs" if total else "dense_macs_per_row")
            newc = r.cost.get("macs" if total else "macs_per_row")
            note = r.reason or (f"-> {r.new_type} {r.config.get('type', '')}" if r.status == "convert" and r.config else "")
            lines.append(
                f"{r.name[:36]:<36} {r.module_type[:10]:<10} {r.shape[:28]:<28} {r.status:<12} "
                f"{'' if dense is None else f'{dense:,.0f}':>14} {'' if newc is None else f'{newc:,.0f}':>13}  {note}"
            )
        if self.example_error:
            lines.append(f"forward with example inputs FAILED after conversion: {self.example_error}")
        return "\n".join(lines)


def _probe_cost(module: nn.Module, rows_per_probe: int, in_features: int) -> dict:
    from ..cost import counter_for

    fn = counter_for(module)
    if fn is None:
        return {}
    x = torch.zeros(1, rows_per_probe, in_features)
    with torch.no_grad():
        y = module(x)
    c = fn(module, (x,), y)
    return {"macs_per_row": c.macs / rows_per_probe, "dense_macs_per_row": c.dense_macs / rows_per_probe,
            "mults_per_row": c.mults / rows_per_probe, "adds_per_row": c.adds / rows_per_probe, "params": c.params}


def inspect_targets(
    model: nn.Module,
    config=None,
    targets="all-linear",
    exclude=None,
    causal=None,
    head="auto",
    example_inputs: tuple | None = None,
    filter_fn=None,
) -> InspectReport:
    """Dry run of :func:`strassenify_`: what would be converted, with shapes and costs. Changes nothing.

    Without ``example_inputs`` the cost column is per input row of Linear layers (MACs per row,
    assuming the sequence length is a multiple of row_tile). With ``example_inputs`` (a tuple of
    model inputs) a converted copy of the model is run: costs are the real per-layer MACs of that
    forward pass divided by its rows, and a forward failure (e.g. 2-D inputs into row_tile > 1) is
    reported in ``example_error`` instead of surfacing later.
    """
    rows = plan_targets(model, config, targets, exclude, causal, head, filter_fn)
    is_causal = resolve_causal(model, causal)
    new = _build(model, rows)
    mods = dict(model.named_modules())
    report = InspectReport(rows, is_causal)
    if example_inputs is None:
        for row in rows:
            if row.status == "convert" and is_linear_like(mods[row.name]):
                m = new[row.name]
                n = getattr(m, "row_tile", 1)
                row.cost = _probe_cost(m, n, dense_weight_of(mods[row.name]).shape[1])
    else:
        from ..cost import count

        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        dense = {c.name: c for c in count(model, *example_inputs).layers}
        converted = copy.deepcopy(model)
        _apply(converted, new, copy_each=True)
        conv = {}
        try:
            conv = {c.name: c for c in count(converted, *example_inputs).layers}
            converted.eval()  # again without counting hooks, in eval mode: fused fast paths differ there
            with torch.no_grad():
                converted(*example_inputs)
        except Exception as e:  # noqa: BLE001 - reported, not raised: this is a dry run
            report.example_error = f"{type(e).__name__}: {e}"
        for row in rows:
            d = dense.get(row.name)
            if d is None:
                continue
            m = mods[row.name]
            nrows = d.dense_macs // dense_weight_of(m).numel() if is_linear_like(m) else 0
            c = conv.get(row.name, d if row.status != "convert" else None)
            row.cost = {"dense_macs": d.dense_macs}
            if c is not None:
                row.cost.update({"macs": c.macs, "mults": c.mults, "adds": c.adds, "params": c.params})
                if nrows:
                    row.cost["macs_per_row"] = c.macs / nrows
            if nrows:
                row.cost["dense_macs_per_row"] = d.dense_macs / nrows
    if not report.matched:
        warnings.warn(f"inspect_targets: targets={targets!r} matched no convertible module", stacklevel=2)
    for row in rows:
        if row.status == "unsupported":
            warnings.warn(f"inspect_targets: {row.name}: {row.reason}", stacklevel=2)
    return report


# ------------------------------------------------------------------ export
def densify_(model: nn.Module, strict: bool = False) -> list[str]:
    """Replace layers that have an exact dense equivalent by plain PyTorch modules, in place.

    Every layer that has one folds itself back (``to_dense()``): SPNLinear -> nn.Linear, SPNConv2d ->
    nn.Conv2d, STLinear with ``row_tile == 1`` -> nn.Linear. STLinear with ``row_tile > 1`` has no
    dense equivalent (a tile mixes rows, ``has_dense_equivalent`` is False): it is kept, with a
    warning, or ``strict=True`` raises. All replacements are built before the model is changed.
    Returns the replaced module names.
    """
    new, kept = {}, []
    for name, m in model.named_modules():
        if not name or any(name.startswith(n + ".") for n in new) or not callable(getattr(m, "to_dense", None)):
            continue
        if getattr(m, "has_dense_equivalent", True):
            new[name] = m.to_dense()
        else:
            kept.append(name)
    if kept:
        msg = (f"densify_: {len(kept)} STLinear layer(s) with row_tile > 1 have no dense equivalent "
               f"(tiles mix rows) and were kept: {kept[:5]}{'...' if len(kept) > 5 else ''}")
        if strict:
            raise ValueError(msg + "; the model was not changed")
        warnings.warn(msg, stacklevel=2)
    for name, mod in new.items():
        _set_module(model, name, mod)
    return list(new)


def unload_(model: nn.Module, strict: bool = True) -> list[str]:
    """Put back the original dense layers of every STLinear that kept them, in place (PEFT's ``unload``).

    Layers converted with ``STLConfig(keep_dense_weight=True)`` (the default) hold the dense layer they
    replaced, unchanged by training or calibration; they get it back exactly. An STLinear without it
    raises ValueError (``strict=True``, the model is then unchanged) or is kept with a warning.
    Returns the restored module names.
    """
    from ..nn import STLinear

    new, missing = {}, []
    for name, m in model.named_modules():
        if name and isinstance(m, STLinear):
            if m.original is not None:
                new[name] = m.to_original()
            else:
                missing.append(name)
    if missing:
        msg = (f"unload_: {len(missing)} STLinear layer(s) do not hold their original dense layer (converted with "
               f"keep_dense_weight=False or loaded from disk): {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if strict:
            raise ValueError(msg + "; the model was not changed (pass strict=False to restore the others)")
        warnings.warn(msg, stacklevel=2)
    for name, mod in new.items():
        _set_module(model, name, mod)
    record.note_unload(model, list(new))
    return list(new)
