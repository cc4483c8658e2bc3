"""nn.Module layers built on :mod:`strassenkit.functional`."""

from .stlinear import STLinear
from .spn import SPNBilinear, SPNConv2d, SPNLinear
from .phase import export_ternary, import_ternary, set_phase

__all__ = ["STLinear", "SPNBilinear", "SPNLinear", "SPNConv2d", "set_phase", "export_ternary", "import_ternary"]
