"""Pure functions: the STL operator (``stl``) and the StrassenNets sum-product network math (``spn``).

Every fast path has a readable reference beside it (``*_reference``); tests compare them in float64.
"""

from .spn import (
    spn_bilinear,
    spn_bilinear_reference,
    spn_conv2d,
    spn_conv2d_reference,
    spn_conv_geometry,
    spn_linear,
    spn_linear_reference,
)
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
    "spn_bilinear",
    "spn_bilinear_reference",
    "spn_linear",
    "spn_linear_reference",
    "spn_conv2d",
    "spn_conv2d_reference",
    "spn_conv_geometry",
]
