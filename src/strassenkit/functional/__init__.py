"""Pure functions: the STL operator (``stl``) and, later, the sum-product network math (``spn``)."""

from .stl import (
    stl_apply,
    stl_apply_reference,
    stl_encode_weight,
    stl_encode_weight_reference,
    stl_matmul,
    tile_format,
)

__all__ = [
    "stl_apply",
    "stl_apply_reference",
    "stl_encode_weight",
    "stl_encode_weight_reference",
    "stl_matmul",
    "tile_format",
]
