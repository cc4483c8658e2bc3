"""Model surgery: convert the layers of a user's model in place.

``strassenify_(model, config, targets="all-linear", exclude=None, causal=False, head="auto")``

Targets (which modules are converted):
- ``"all-linear"``: every module of a type the config supports (STLConfig: nn.Linear;
  SPNConfig: nn.Linear and nn.Conv2d), except the output head (see ``head``);
- a module name or a list of names: exact (``"blocks.0.mlp.fc1"``) or a suffix on a ``.`` boundary
  (``"fc1"`` matches every ``*.fc1``);
- ``"re:<regex>"``: names that the regex matches in full (``re.fullmatch``);
- a mapping ``{name, suffix or "re:<regex>": config or None}`` for per-layer configs: an exact
  name wins over patterns, then patterns in insertion order; ``None`` skips the module. ``config``
  may then be None, or the mapping may be passed as ``config`` itself.
``exclude`` takes the same names / suffixes / regexes and always wins.

Output head (``head``): "auto" excludes, from "all-linear" only, ``model.get_output_embeddings()``
when the model has it, else modules whose last name component is one of ``lm_head, head,
classifier, fc_out, output`` , else the last nn.Linear in registration order. ``head=None`` keeps
it in, a name (or list) names it explicitly. A head that is named in ``targets`` is converted.

**Causal models.** An STL tile with ``row_tile > 1`` mixes ``row_tile`` consecutive rows (tokens) of
a sample, so in an autoregressive model earlier positions would see later ones. With
``causal=True``, or when the model looks causal (a Hugging Face ``model.config.is_decoder`` or
``is_causal`` flag, or an architecture named ``*ForCausalLM`` / ``*LMHeadModel``), every STLConfig with
``row_tile=None`` is converted with ``row_tile=1`` and one with ``row_tile > 1`` raises ValueError.

No half-converted model: every replacement is planned and built first; the model is changed only
after all of them were built. Unsupported module types named by ``targets`` are skipped with a
warning that says why; a call that matches nothing warns.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.stlinear import STLinear
from .config import SPNConfig, STLConfig, _is_config, register_transform, supported_types, transform_for

__all__ = ["strassenify_", "inspect_targets", "densify_", "InspectReport", "TargetRow", "is_causal_model"]

_HEAD_NAMES = ("lm_head", "head", "classifier", "fc_out", "output")


# ------------------------------------------------------------------ transforms
@register_transform(STLConfig, (nn.Linear,))
def _stl_transform(module: nn.Linear, config: STLConfig, name: str) -> STLinear:
    layer = STLinear.from_linear(
        module, init=config.init, tile=config.tile, rank=config.rank, row_tile=config.row_tile, seed=config.seed
    )
    if config.keep_dense_weight:
        layer.register_buffer("dense_weight", module.weight.detach().clone(), persistent=False)
    return layer


def _spn_classes():
    try:
        from ..nn import spn
    except ImportError as e:  # pragma: no cover - depends on the SPN module being installed
        raise ImportError(f"SPNConfig needs strassenkit.nn.spn (SPNLinear, SPNConv2d): {e}") from e
    return spn.SPNLinear, spn.SPNConv2d


@register_transform(SPNConfig, (nn.Linear, nn.Conv2d))
def _spn_transform(module: nn.Module, config: SPNConfig, name: str) -> nn.Module:
    SPNLinear, SPNConv2d = _spn_classes()
    if isinstance(module, nn.Linear):
        new = SPNLinear.from_linear(module, rank=config.rank_for(module.out_features), quantizer=config.quantizer,
                                    seed=config.seed)
    elif isinstance(module, nn.Conv2d):
        if config.groups is not None and config.groups != module.groups:
            raise ValueError(
                f"{name}: SPNConfig.groups={config.groups} but the conv has groups={module.groups}; SPNConv2d keeps "
                f"the conv's groups (use groups=None)"
            )
        rank = config.rank_for(module.out_channels)
        if rank is not None and rank % module.groups:
            rank = max(module.groups, rank // module.groups * module.groups)
        new = SPNConv2d.from_conv2d(module, rank=rank, out_patch=config.out_patch, quantizer=config.quantizer,
                                    seed=config.seed)
    else:
        raise TypeError(f"{name}: SPNConfig converts nn.Linear and nn.Conv2d, got {type(module).__name__}")
    if config.ternary:
        new.set_phase("ternary")
    return new


# ------------------------------------------------------------------ matching
def _match(key: str, name: str) -> bool:
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return name == key or name.endswith("." + key)


def _patterns(arg, what: str) -> list[str]:
    if arg is None:
        return []
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, (list, tuple, set)) and all(isinstance(a, str) for a in arg):
        return list(arg)
    raise TypeError(f"{what} must be a name, 're:<regex>', or a list of them, got {arg!r}")


def is_causal_model(model: nn.Module) -> bool:
    """True if the model says it is autoregressive (HF-style config flags or class/architecture names)."""
    if getattr(model, "is_causal", False) is True:
        return True
    cfg = getattr(model, "config", None)
    if cfg is not None:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        if get("is_decoder", False) is True or get("is_causal", False) is True:
            return True
        archs = get("architectures", None) or []
        if any(("CausalLM" in a or "LMHeadModel" in a) for a in archs if isinstance(a, str)):
            return True
    cls = type(model).__name__
    return cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel")


def _find_heads(model: nn.Module, head) -> set[str]:
    if head is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    if head != "auto":
        pats = _patterns(head, "head")
        found = {n for n, _ in model.named_modules() if n and any(_match(p, n) for p in pats)}
        if not found:
            warnings.warn(f"head={head!r} matched no module of the model", stacklevel=3)
        return found
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except Exception:  # noqa: BLE001 - a model may not implement it
            out = None
        if isinstance(out, nn.Module) and id(out) in names:
            return {names[id(out)]}
    by_name = {n for n, m in model.named_modules() if n and n.split(".")[-1] in _HEAD_NAMES and isinstance(m, (nn.Linear, nn.Conv2d))}
    if by_name:
        return by_name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {linears[-1]} if linears else set()


@dataclass
class TargetRow:
    """One module considered by a conversion (a row of :class:`InspectReport`)."""

    name: str
    module_type: str
    shape: str
    status: str  # "convert", "skipped", "excluded", "head", "unsupported", "not-targeted"
    config: dict | None = None
    reason: str = ""
    new_type: str = ""
    cost: dict = field(default_factory=dict)


def _shape(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"{m.in_features}->{m.out_features}"
    if isinstance(m, nn.Conv2d):
        return f"{m.in_channels}->{m.out_channels} k{tuple(m.kernel_size)} s{tuple(m.stride)} g{m.groups}"
    if isinstance(m, STLinear):
        return f"{m.in_features}->{m.out_features} <{m.row_tile},{m.tile},{m.tile}> r{m.rank}"
    return ""


def _causal_config(config, name: str, causal: bool):
    if not causal or not isinstance(config, STLConfig):
        return config
    if config.row_tile is None:
        return config.with_(row_tile=1)
    if config.row_tile != 1:
        raise ValueError(
            f"{name}: causal model but STLConfig(row_tile={config.row_tile}): a {config.row_tile}x{config.tile} "
            f"activation tile mixes {config.row_tile} consecutive tokens, so earlier positions would see later ones. "
            f"Use STLConfig(row_tile=1) (or row_tile=None, which becomes 1 for causal models)"
        )
    return config


def _plan(model, config, targets, exclude, causal, head) -> list[TargetRow]:
    """Decide, for every relevant module, whether and how it is converted (changes nothing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mapping = targets if isinstance(targets, dict) else None
    if mapping is None:
        if config is None:
            raise ValueError("config is None: pass a config (STLConfig(...) / SPNConfig(...)) or a targets mapping {name: config}")
        if not _is_config(config):
            raise TypeError(f"config must be a registered config such as STLConfig or SPNConfig, got {type(config).__name__}")
        transform_for(config)
    else:
        for k, v in mapping.items():
            if not isinstance(k, str):
                raise TypeError(f"targets mapping keys must be names or 're:<regex>' strings, got {k!r}")
            if v is not None and not _is_config(v):
                raise TypeError(f"targets[{k!r}] must be a config or None, got {type(v).__name__}")
    all_linear = isinstance(targets, str) and targets in ("all-linear", "all")
    pats = [] if (mapping is not None or all_linear) else _patterns(targets, "targets")
    excl = _patterns(exclude, "exclude")
    for p in pats + excl + list(mapping or {}):
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from None
    heads = _find_heads(model, head) if all_linear else set()
    causal = bool(causal) or is_causal_model(model)
    parents = {}
    for pname, pmod in model.named_modules():
        for cname, child in pmod.named_children():
            parents[f"{pname}.{cname}" if pname else cname] = pmod

    rows: list[TargetRow] = []
    for name, module in model.named_modules():
        if not name:
            continue
        cfg, explicit = None, False
        if mapping is not None:
            if name in mapping:
                cfg, explicit, hit = mapping[name], True, True
            else:
                hit = False
                for k, v in mapping.items():
                    if _match(k, name):
                        cfg, explicit, hit = v, True, True
                        break
            if hit and cfg is None:
                rows.append(TargetRow(name, type(module).__name__, _shape(module), "skipped", None, "targets mapping gives None"))
                continue
            if not hit:
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    rows.append(TargetRow(name, type(module).__name__, _shape(module), "not-targeted"))
                continue
        elif all_linear:
            if isinstance(module, supported_types(config)):
                cfg = config
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                rows.append(TargetRow(name, type(module).__name__, _shape(module), "not-targeted",
                                      reason=f"{type(config).__name__} does not convert {type(module).__name__}"))
                continue
            else:
                continue
        else:
            if any(_match(p, name) for p in pats):
                cfg, explicit = config, True
            else:
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    rows.append(TargetRow(name, type(module).__name__, _shape(module), "not-targeted"))
                continue
        if not isinstance(module, supported_types(cfg)) and next(module.children(), None) is not None:
            continue  # a container matched by a name pattern: its children are considered on their own
        row = TargetRow(name, type(module).__name__, _shape(module), "convert", cfg.to_dict())
        if any(_match(p, name) for p in excl):
            row.status, row.reason = "excluded", "matched exclude"
        elif name in heads and not explicit:
            row.status, row.reason = "head", "output head kept dense (pass head=None to convert it)"
        elif not isinstance(module, supported_types(cfg)):
            kinds = ", ".join(t.__name__ for t in supported_types(cfg))
            row.status = "unsupported"
            row.reason = f"{type(module).__name__} is not supported by {type(cfg).__name__} (it converts {kinds}); skipped"
        elif isinstance(parents.get(name), nn.MultiheadAttention):
            row.status = "unsupported"
            row.reason = ("inside nn.MultiheadAttention, which reads out_proj.weight directly instead of calling it; "
                          "skipped (write attention with separate nn.Linear projections to convert it)")
        else:
            cfg = _causal_config(cfg, name, causal)
            row.config = cfg.to_dict()
            row._cfg = cfg  # type: ignore[attr-defined]
        rows.append(row)
    return rows


def _build(model, rows) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    new = {}
    for row in rows:
        if row.status != "convert":
            continue
        cfg = row._cfg  # type: ignore[attr-defined]
        try:
            new[row.name] = transform_for(cfg)(mods[row.name], cfg, row.name)
        except Exception as e:
            raise type(e)(f"converting {row.name} ({row.module_type} {row.shape}) with {cfg!r} failed: {e}; "
                          f"the model was not changed") from e
        row.new_type = type(new[row.name]).__name__
    return new


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _warn_rows(rows, converted: int, targets) -> None:
    for row in rows:
        if row.status == "unsupported":
            warnings.warn(f"strassenify_: {row.name}: {row.reason}", stacklevel=3)
    if converted == 0:
        warnings.warn(f"strassenify_: targets={targets!r} matched no convertible module; the model is unchanged", stacklevel=3)


def strassenify_(
    model: nn.Module,
    config=None,
    targets="all-linear",
    exclude=None,
    causal: bool = False,
    head="auto",
) -> list[str]:
    """Convert the matched modules of ``model`` in place; returns the converted module names.

    See the module docstring for ``targets``, ``exclude``, ``head`` and the causal rule. The model is
    either fully converted or unchanged (an error while building any replacement changes nothing).
    """
    if isinstance(config, dict) and targets == "all-linear":  # strassenify_(model, {name: config})
        config, targets = None, config
    rows = _plan(model, config, targets, exclude, causal, head)
    new = _build(model, rows)
    for name, mod in new.items():
        _set_module(model, name, mod)
    _warn_rows(rows, len(new), targets)
    return list(new)


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
        rows = []
        for r in self.rows:
            d = {k: v for k, v in r.__dict__.items() if not k.startswith("_")}
            rows.append(d)
        return {"causal": self.causal, "rows": rows, "example_error": self.example_error}

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
    from ..cost import _counter_for

    fn = _counter_for(module)
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
    causal: bool = False,
    head="auto",
    example_inputs: tuple | None = None,
) -> InspectReport:
    """Dry run of :func:`strassenify_`: what would be converted, with shapes and costs. Changes nothing.

    Without ``example_inputs`` the cost column is per input row of Linear layers (MACs per row,
    assuming the sequence length is a multiple of row_tile). With ``example_inputs`` (a tuple of
    model inputs) a converted copy of the model is run: costs are the real per-layer MACs of that
    forward pass divided by its rows, and a forward failure (e.g. 2-D inputs into row_tile > 1) is
    reported in ``example_error`` instead of surfacing later.
    """
    if isinstance(config, dict) and targets == "all-linear":
        config, targets = None, config
    rows = _plan(model, config, targets, exclude, causal, head)
    is_causal = bool(causal) or is_causal_model(model)
    new = _build(model, rows)
    mods = dict(model.named_modules())
    report = InspectReport(rows, is_causal)
    if example_inputs is None:
        for row in rows:
            if row.status == "convert" and isinstance(mods[row.name], nn.Linear):
                m = new[row.name]
                n = getattr(m, "row_tile", 1)
                row.cost = _probe_cost(m, n, mods[row.name].in_features)
    else:
        from ..cost import count

        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        dense = {c.name: c for c in count(model, *example_inputs).layers}
        converted = copy.deepcopy(model)
        for name, mod in new.items():
            _set_module(converted, name, copy.deepcopy(mod))
        try:
            conv = {c.name: c for c in count(converted, *example_inputs).layers}
        except Exception as e:  # noqa: BLE001 - reported, not raised: this is a dry run
            conv = {}
            report.example_error = f"{type(e).__name__}: {e}"
        for row in rows:
            d = dense.get(row.name)
            if d is None:
                continue
            m = mods[row.name]
            nrows = d.dense_macs // (m.in_features * m.out_features) if isinstance(m, nn.Linear) else 0
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
@torch.no_grad()
def _stl_to_dense(m: STLinear) -> nn.Linear:
    """The nn.Linear equal to a row_tile=1 STLinear (each output row is a linear map of its own row)."""
    from ..functional.stl import stl_apply

    w = m.w_hat
    eye = torch.eye(m.in_features, dtype=torch.float64, device=w.device).unsqueeze(0)
    cols = stl_apply(eye, w.double(), m.enc_x.double(), m.dec.double(), m.format, out_features=m.out_features)[0]
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight.copy_(cols.T.to(w.dtype))
    if m.bias is not None:
        lin.bias.copy_(m.bias)
    return lin


def densify_(model: nn.Module, strict: bool = False) -> list[str]:
    """Replace layers that have an exact dense equivalent by plain PyTorch modules, in place.

    - modules with a ``to_dense()`` method (SPNLinear -> nn.Linear, SPNConv2d -> nn.Conv2d);
    - STLinear with ``row_tile == 1`` -> nn.Linear (its weight is read off by applying it to the
      identity in float64).
    STLinear with ``row_tile > 1`` has no dense equivalent (a tile mixes rows): it is kept, with a
    warning, or ``strict=True`` raises. All replacements are built before the model is changed.
    Returns the replaced module names.
    """
    new, kept = {}, []
    for name, m in model.named_modules():
        if not name or any(name.startswith(n + ".") for n in new):
            continue
        if isinstance(m, STLinear):
            if m.row_tile == 1:
                new[name] = _stl_to_dense(m)
            else:
                kept.append(name)
        elif callable(getattr(m, "to_dense", None)):
            new[name] = m.to_dense()
    if kept:
        msg = (f"densify_: {len(kept)} STLinear layer(s) with row_tile > 1 have no dense equivalent "
               f"(tiles mix rows) and were kept: {kept[:5]}{'...' if len(kept) > 5 else ''}")
        if strict:
            raise ValueError(msg + "; the model was not changed")
        warnings.warn(msg, stacklevel=2)
    for name, mod in new.items():
        _set_module(model, name, mod)
    return list(new)

