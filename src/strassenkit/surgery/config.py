"""Versioned conversion configs and the registry that maps a config type to its module transform.

A config is a frozen dataclass that says *what* a matched module becomes; ``strassenify_`` decides
*which* modules are matched. Configs serialize to JSON (``to_dict`` / ``to_json`` /
:func:`config_from_dict` / :func:`config_from_json`) with a ``"type"`` and a ``"version"`` field, so
a conversion recipe can be stored beside a checkpoint and replayed.

The registry (like torchao's ``quantize_`` configs) maps each config class to a transform
``fn(module, config, name) -> nn.Module`` and to the module types it supports:

    @register_transform(MyConfig, (nn.Linear,))
    def _my_transform(module, config, name): ...
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Callable

__all__ = [
    "STLConfig",
    "SPNConfig",
    "register_transform",
    "transform_for",
    "supported_types",
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


def _check_int(name, v, lo=1, allow_none=False):
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{' or None' if allow_none else ''}, got {v!r}")


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
        _check_int("tile", self.tile)
        _check_int("rank", self.rank, allow_none=True)
        _check_int("row_tile", self.row_tile, allow_none=True)
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
        _check_int("rank", self.rank, allow_none=True)
        if self.rank_ratio is not None and not (isinstance(self.rank_ratio, (int, float)) and self.rank_ratio > 0):
            raise ValueError(f"rank_ratio must be a positive number, got {self.rank_ratio!r}")
        _check_int("out_patch", self.out_patch)
        _check_int("groups", self.groups, allow_none=True)
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
_TRANSFORMS: dict[type, tuple[Callable, tuple[type, ...]]] = {}
_CONFIG_TYPES: dict[str, type] = {"STLConfig": STLConfig, "SPNConfig": SPNConfig}


def register_transform(config_type: type, module_types: tuple[type, ...]):
    """Decorator: register ``fn(module, config, name) -> nn.Module`` for ``config_type``.

    ``module_types`` are the module classes the transform accepts (exact type or subclass).
    """

    def deco(fn):
        _TRANSFORMS[config_type] = (fn, tuple(module_types))
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
    transform_for(config)
    return _TRANSFORMS[type(config)][1]


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


def _is_config(obj) -> bool:
    return type(obj) in _TRANSFORMS or isinstance(obj, _ConfigBase)

