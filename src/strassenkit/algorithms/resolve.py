"""Resolve an ``init=`` argument into the BilinearAlgorithm a layer uses: the one place that does it.

Accepted values:
- a :class:`BilinearAlgorithm`;
- an init family (``"random"``, ``"als"``, ``"truncate"``, ...; see :func:`.families.families`),
  which needs the tile format and the rank;
- a catalogue name (``"strassen"``, ``"exact:laderman"``, ``"<4,4,4>"``, ``"schoolbook:1,4,4"``),
  which fixes the format and the rank itself.
"""

from __future__ import annotations

from .bilinear import BilinearAlgorithm
from .catalogue import available, get
from .families import build_family, families, is_family

__all__ = ["resolve", "exact_algorithm"]


def exact_algorithm(init) -> BilinearAlgorithm | None:
    """The algorithm ``init`` fixes by itself (a BilinearAlgorithm or a catalogue name), or None for a family.

    Raises TypeError/ValueError with the accepted values when ``init`` is neither.
    """
    if isinstance(init, BilinearAlgorithm):
        return init
    if not isinstance(init, str):
        raise TypeError(f"init must be a string or a BilinearAlgorithm, got {type(init).__name__}")
    if is_family(init):
        return None
    try:
        return get(init)
    except KeyError:
        raise ValueError(
            f"init={init!r} is neither an approximation family {families()} nor a catalogue algorithm {available()} "
            f"('schoolbook:n,m,p' and '<n,m,p>' work too)"
        ) from None


def resolve(init, n: int, m: int, p: int, rank: int, seed: int = 0) -> BilinearAlgorithm:
    """The BilinearAlgorithm that ``init`` names for format <n,m,p> and ``rank``; clear errors otherwise."""
    alg = exact_algorithm(init)
    if alg is None:
        return build_family(init, n, m, p, rank, seed)
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
