"""Exact and approximate bilinear matrix multiplication algorithms (the bottom layer of strassenkit).

- :class:`BilinearAlgorithm`: factor matrices (U, V, W) in standard form, ``verify()``, ``kron()``,
  symmetries (``transpose()``, ``cyclic()``), direct sums (``concat()``).
- :func:`get`, :func:`available`: the verified catalogue.
"""

from .bilinear import BilinearAlgorithm, matmul_tensor, tensor_residual
from .catalogue import available, from_formulas, get, load_alphatensor_npz, register, schoolbook
from .approximate import approximate  # registers the approximation families (als, truncate, polynomial)
from .search import search  # registers the verified search results shipped under algorithms/data/

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
    "approximate",
    "search",
]
