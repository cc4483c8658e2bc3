"""Versioned conversion configs, each with its module transform registered beside it.

A config is a frozen dataclass that says *what* a matched module becomes; :mod:`.targets` decides
*which* modules are matched and :func:`strassenify_` applies the transforms. Configs serialize to JSON (``to_dict`` / ``to_json`` /
:func:`config_from_dict` / :func:`config_from_json`) with a ``"type"`` and a ``"version"`` field, so
a conversion recipe can be stored beside a checkpoint and replayed.

The registry (like torchao's ``quantize_`` configs) maps each config class to a transform
``fn(module, config, name) -> nn.Module`` and to the module types it supports:

    @register_transform(MyConfig, (nn.Linear,))
    def _my_transform(module, config, name): ...

:class:`PerModuleConfig` is the config type for per-layer configs: ``{name, suffix or "re:<regex>":
config or None}`` (like torchao's ``ModuleFqnToConfig``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Callable

from torch import nn

from .._utils import check_int
from ..nn import SPNConv2d, SPNLinear, STLinear
from ..nn.stlinear import is_linear_like

__all__ = [
    "STLConfig",
    "SPNConfig",
    "PerModuleConfig",
    "register_transform",
    "is_config",
    "transform_for",
    "supported_types",
    "supports",
    "config_from_dict",
    "config_from_json",
]


class _ConfigBase:
    """Shared JSON helpers (``version`` is checked on load)."""

    VERSION = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["type"] = type(self).__name__
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def with_(self, **changes):
        """A copy with some fields changed (configs are frozen)."""
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class STLConfig(_ConfigBase):
    """Replace nn.Linear by :class:`strassenkit.nn.STLinear` (Strassen-Tile).

    Fields:
        tile: t (weight tiles t x t).  rank: r, or None to take the rank of an exact catalogue ``init``.
        init: "random", an approximation family ("als", ...) or a catalogue name ("strassen_x_strassen").
        row_tile: rows per activation tile (None -> t). row_tile > 1 mixes consecutive rows (tokens)
            of a sample: it is forbidden for causal models, where ``strassenify_`` forces 1 or raises.
        seed: seed of the init family.
        keep_dense_weight: keep the dense weight as a non-persistent buffer ``dense_weight`` (N, K) on
            the new layer, so :func:`calibrate_` can run without a reference model. Costs N*K floats of
            memory; it is not saved in ``state_dict``.
        version: config schema version.
    """

    tile: int = 4
    rank: int | None = 24
    init: str = "random"
    row_tile: int | None = None
    seed: int = 0
    keep_dense_weight: bool = True
    version: int = 1

    def __post_init__(self):
        check_int("tile", self.tile)
        check_int("rank", self.rank, allow_none=True)
        check_int("row_tile", self.row_tile, allow_none=True)
        if not isinstance(self.init, str):
            raise TypeError(f"STLConfig.init must be a string (family or catalogue name), got {type(self.init).__name__}")
        if self.version != self.VERSION:
            raise ValueError(f"STLConfig version {self.version} is not supported (this strassenkit reads version {self.VERSION})")


@dataclass(frozen=True)
class SPNConfig(_ConfigBase):
    """Replace nn.Linear / nn.Conv2d by StrassenNets layers (``SPNLinear`` / ``SPNConv2d``).

    The new layers are initialized from the dense ones by truncated SVD (``from_linear`` /
    ``from_conv2d`` in :mod:`strassenkit.nn.spn`): exact when the rank is at least the dense map's
    rank, which is the default.

    Fields:
        rank: hidden width r of the sum-product network; None (with rank_ratio None) takes the exact
            SVD rank (min(K, N) for Linear).
        rank_ratio: r as a multiple of the layer's output width (out_features / out_channels);
            at most one of ``rank`` and ``rank_ratio`` may be set.
        ternary: start in the "ternary" phase (encoders and decoder quantized to scale*{-1,0,1},
            straight-through gradients). Default False: start in "full" precision and switch later
            with :func:`strassenkit.nn.phase.set_phase`, as the StrassenNets recipe does.
        quantizer: "twn" (threshold from the mean magnitude) or "fixed".
        out_patch: spatial output patch p of SPNConv2d (1 = per output pixel).
        groups: None (the conv's own groups, the only mode ``from_conv2d`` supports) or that same
            number (a different value raises).
        seed: seed for the extra hidden units beyond the matrix rank.
        version: config schema version.
    """

    rank: int | None = None
    rank_ratio: float | None = None
    ternary: bool = False
    quantizer: str = "twn"
    out_patch: int = 1
    groups: int | None = None
    seed: int = 0
    version: int = 1

    def __post_init__(self):
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError(f"SPNConfig takes at most one of rank= and rank_ratio=, got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}")
        check_int("rank", self.rank, allow_none=True)
        if self.rank_ratio is not None and not (isinstance(self.rank_ratio, (int, float)) and self.rank_ratio > 0):
            raise ValueError(f"rank_ratio must be a positive number, got {self.rank_ratio!r}")
        check_int("out_patch", self.out_patch)
        check_int("groups", self.groups, allow_none=True)
        if self.quantizer not in ("twn", "fixed"):
            raise ValueError(f"quantizer must be 'twn' or 'fixed', got {self.quantizer!r}")
        if self.version != self.VERSION:
            raise ValueError(f"SPNConfig version {self.version} is not supported (this strassenkit reads version {self.VERSION})")

    def rank_for(self, out_width: int) -> int | None:
        """The rank used for a layer with ``out_width`` outputs (None: the exact SVD rank)."""
        if self.rank_ratio is not None:
            return max(1, int(round(self.rank_ratio * out_width)))
        return self.rank


# ------------------------------------------------------------------ registry
_TRANSFORMS: dict[type, tuple[Callable, tuple[type, ...], Callable | None]] = {}
_CONFIG_TYPES: dict[str, type] = {"STLConfig": STLConfig, "SPNConfig": SPNConfig}


def register_transform(config_type: type, module_types: tuple[type, ...], accepts: Callable | None = None):
    """Decorator: register ``fn(module, config, name) -> nn.Module`` for ``config_type``.

    ``module_types`` are the module classes the transform accepts (exact type or subclass);
    ``accepts(module) -> bool``, when given, decides instead (for duck-typed modules such as
    transformers' Conv1D, which strassenkit does not import).
    """

    def deco(fn):
        _TRANSFORMS[config_type] = (fn, tuple(module_types), accepts)
        _CONFIG_TYPES[config_type.__name__] = config_type
        return fn

    return deco


def transform_for(config) -> Callable:
    try:
        return _TRANSFORMS[type(config)][0]
    except KeyError:
        raise TypeError(
            f"no transform registered for config type {type(config).__name__}; known: "
            f"{sorted(t.__name__ for t in _TRANSFORMS)} (register one with register_transform)"
        ) from None


def supported_types(config) -> tuple[type, ...]:
    """The module classes ``config``'s transform names (for messages; :func:`supports` decides)."""
    transform_for(config)
    return _TRANSFORMS[type(config)][1]


def supports(config, module) -> bool:
    """True if ``config``'s transform converts ``module``."""
    transform_for(config)
    _, types, accepts = _TRANSFORMS[type(config)]
    return bool(accepts(module)) if accepts is not None else isinstance(module, types)


def config_from_dict(d: dict):
    """Inverse of ``config.to_dict()``: ``{"type": "STLConfig", "tile": 4, ...}`` -> STLConfig(...)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a config dict needs a 'type' key (one of {sorted(_CONFIG_TYPES)}), got {d!r}")
    d = dict(d)
    name = d.pop("type")
    if name not in _CONFIG_TYPES:
        raise ValueError(f"unknown config type {name!r}; known: {sorted(_CONFIG_TYPES)}")
    cls = _CONFIG_TYPES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{name} has no field(s) {unknown}; fields are {sorted(known)}")
    return cls(**d)


def config_from_json(s: str):
    return config_from_dict(json.loads(s))


def is_config(obj) -> bool:
    """True for a config that has a registered transform (STLConfig, SPNConfig, or one you registered)."""
    return type(obj) in _TRANSFORMS or (isinstance(obj, _ConfigBase) and not isinstance(obj, PerModuleConfig))


@dataclass(frozen=True)
class PerModuleConfig:
    """Per-layer configs: ``{module name, suffix or "re:<regex>": config or None}``.

    An exact module name wins over patterns, then patterns match in insertion order; ``None`` keeps the
    module as it is. ``strassenify_(model, PerModuleConfig({...}))``; a plain dict passed as ``config``
    (or as ``targets``) means the same.
    """

    configs: dict

    def __post_init__(self):
        if not isinstance(self.configs, dict):
            raise TypeError(f"PerModuleConfig takes a dict {{name or 're:<regex>': config or None}}, got {type(self.configs).__name__}")
        for k, v in self.configs.items():
            if not isinstance(k, str):
                raise TypeError(f"PerModuleConfig keys must be module names or 're:<regex>' strings, got {k!r}")
            if v is not None and not is_config(v):
                raise TypeError(f"PerModuleConfig[{k!r}] must be a config (STLConfig, SPNConfig, ...) or None, got {type(v).__name__}")


# ------------------------------------------------------------------ transforms (beside their configs)
@register_transform(STLConfig, (nn.Linear,), accepts=is_linear_like)  # nn.Linear and transformers' Conv1D
def _stl_transform(module: nn.Module, config: STLConfig, name: str) -> STLinear:
    layer = STLinear.from_linear(
        module, init=config.init, tile=config.tile, rank=config.rank, row_tile=config.row_tile, seed=config.seed
    )
    if config.keep_dense_weight:
        layer.keep_original(module)
    return layer


@register_transform(SPNConfig, (nn.Linear, nn.Conv2d))
def _spn_transform(module: nn.Module, config: SPNConfig, name: str) -> nn.Module:
    if isinstance(module, nn.Linear):
        new = SPNLinear.from_linear(module, rank=config.rank_for(module.out_features), quantizer=config.quantizer,
                                    seed=config.seed)
    else:
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
    if config.ternary:
        new.set_phase("ternary")
    return new

