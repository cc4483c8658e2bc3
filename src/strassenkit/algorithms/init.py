"""Resolve an ``init=`` argument into a BilinearAlgorithm of a given tile format and rank.

Accepted values:
- a :class:`BilinearAlgorithm` whose format and rank match;
- a catalogue name (``"strassen"``, ``"exact:laderman"``, ``"<4,4,4>"``, ``"schoolbook:1,4,4"``);
- ``"random"``: the variance-preserving Gaussian baseline (:func:`random_algorithm`);
- an approximation family of :func:`strassenkit.algorithms.approximate` (``"als"``, ...), when present.
"""

from __future__ import annotations

import numpy as np

from .bilinear import BilinearAlgorithm
from .catalogue import available, get

__all__ = ["random_algorithm", "resolve_init", "approximation_families"]

# Families registered by strassenkit.algorithms.approximate: name -> fn(n, m, p, rank, seed) -> BilinearAlgorithm
_FAMILIES: dict = {}


def approximation_families() -> list[str]:
    return sorted(_FAMILIES)


def register_family(name: str):
    """Decorator used by the approximation module: fn(n, m, p, rank, seed) -> BilinearAlgorithm."""

    def deco(fn):
        _FAMILIES[name] = fn
        return fn

    return deco


def random_algorithm(n: int, m: int, p: int, rank: int, seed: int = 0) -> BilinearAlgorithm:
    """Variance-preserving Gaussian factors for <n,m,p> with ``rank`` products.

    U ~ N(0, 1/(n m)), V ~ N(0, 1/(m p)), W ~ N(0, m / rank). For i.i.d. zero-mean inputs this makes
    the STL output variance equal to the dense product's: each encoded entry keeps the variance of the
    tile entries, a core entry sums K/m products, and the decoder sums ``rank`` of them with variance
    m/rank each, giving K * var(x) * var(w) as for x @ w.
    """
    rng = np.random.default_rng(seed)
    U = rng.normal(0.0, (1.0 / (n * m)) ** 0.5, size=(n * m, rank))
    V = rng.normal(0.0, (1.0 / (m * p)) ** 0.5, size=(m * p, rank))
    W = rng.normal(0.0, (m / rank) ** 0.5, size=(n * p, rank))
    return BilinearAlgorithm(n, m, p, U, V, W, name="random", source=f"variance-preserving Gaussian, seed {seed}")


@register_family("random")
def _random_family(n, m, p, rank, seed):
    return random_algorithm(n, m, p, rank, seed)


def resolve_init(init, n: int, m: int, p: int, rank: int, seed: int = 0) -> BilinearAlgorithm:
    """Return the BilinearAlgorithm that ``init`` names for format <n,m,p> and ``rank``; clear errors otherwise."""
    if isinstance(init, BilinearAlgorithm):
        alg = init
    elif isinstance(init, str):
        key = init.strip().lower()
        if key in _FAMILIES:
            alg = _FAMILIES[key](n, m, p, rank, seed)
        else:
            try:
                alg = get(key)
            except KeyError:
                raise ValueError(
                    f"init={init!r} is neither an approximation family {approximation_families()} nor a "
                    f"catalogue algorithm {available()}"
                ) from None
    else:
        raise TypeError(f"init must be a string or a BilinearAlgorithm, got {type(init).__name__}")
    if alg.format != (n, m, p):
        raise ValueError(
            f"init algorithm {alg.name!r} is for <{alg.n},{alg.m},{alg.p}> tiles but the layer needs "
            f"<{n},{m},{p}> (row_tile x tile activations, tile x tile weights); pick a matching algorithm "
            f"or change tile/row_tile"
        )
    if alg.rank != rank:
        raise ValueError(
            f"init algorithm {alg.name!r} has rank {alg.rank} but the layer was built with rank={rank}; "
            f"pass rank={alg.rank} or an approximate init such as 'random'"
        )
    return alg
