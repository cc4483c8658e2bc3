"""The registry of init families: named builders of an approximate (or exact) algorithm of any rank.

A family is ``fn(n, m, p, rank, seed, **options) -> BilinearAlgorithm`` for the tile format <n,m,p>.
This module holds the one registry and the ``random`` baseline; :mod:`.approximate` registers the
theory-backed families (``als``, ``truncate``, ``polynomial``, ``polynomial_ls``) beside their code.
A new family goes next to its math with ``@register_family("name")``; ``STLinear(init="name")``,
``STLConfig(init="name")`` and ``approximate("name", ...)`` then all accept it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .bilinear import BilinearAlgorithm

__all__ = ["families", "register_family", "build_family", "is_family", "random_algorithm"]

_FAMILIES: dict[str, Callable[..., BilinearAlgorithm]] = {}


def families() -> list[str]:
    """Names of the registered init families, sorted."""
    return sorted(_FAMILIES)


def is_family(name) -> bool:
    """True if ``name`` (any case, surrounding spaces ignored) is a registered init family."""
    return isinstance(name, str) and name.strip().lower() in _FAMILIES


def register_family(name: str):
    """Decorator: register ``fn(n, m, p, rank, seed, **options) -> BilinearAlgorithm`` as family ``name``."""

    def deco(fn):
        _FAMILIES[name.strip().lower()] = fn
        return fn

    return deco


def build_family(name: str, n: int, m: int, p: int, rank: int, seed: int = 0, **options) -> BilinearAlgorithm:
    """Build family ``name`` for <n,m,p> with ``rank`` products; ValueError naming the known families otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _FAMILIES:
        raise ValueError(f"unknown init family {name!r}; registered families: {families()}")
    return _FAMILIES[key](n, m, p, rank, seed, **options)


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
