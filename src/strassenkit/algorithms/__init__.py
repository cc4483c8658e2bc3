"""Exact and approximate bilinear matrix multiplication algorithms (the bottom layer of strassenkit).

- :class:`BilinearAlgorithm`: factor matrices (U, V, W) in standard form, ``verify()``, ``kron()``,
  symmetries (``transpose()``, ``cyclic()``), direct sums (``concat()``).
- :func:`get`, :func:`available`: the verified catalogue (exact algorithms, fixed format and rank).
- :func:`families`, :func:`register_family`: init families (any rank: ``random``, ``als``, ...).
- :func:`resolve`: the one function that turns an ``init=`` value into an algorithm.
- :func:`approximate`, :func:`search`: build approximate algorithms, search for exact ones.
"""

from .bilinear import BilinearAlgorithm, matmul_tensor, tensor_residual
from .catalogue import available, from_formulas, get, load_alphatensor_npz, register, schoolbook
from .families import build_family, families, random_algorithm, register_family
from .approximate import approximate  # registers the approximation families (als, truncate, polynomial)
from .search import search, search_stats  # registers the verified search results shipped under algorithms/data/
from .resolve import exact_algorithm, resolve

__all__ = [
    "BilinearAlgorithm",
    "matmul_tensor",
    "tensor_residual",
    "available",
    "get",
    "register",
    "schoolbook",
    "from_formulas",
    "load_alphatensor_npz",
    "families",
    "register_family",
    "build_family",
    "random_algorithm",
    "approximate",
    "search",
    "search_stats",
    "resolve",
    "exact_algorithm",
]
