"""nn.Module layers built on :mod:`strassenkit.functional`; each layer owns its conversion to and from dense."""

from .stlinear import STLinear
from .spn import PHASES, SPNBilinear, SPNConv2d, SPNLinear, SPNModule
from .phase import export_ternary, import_ternary, set_phase
from .quantize import ternarize_fixed, ternarize_twn
from .padding import current_row_mask, row_mask

__all__ = ["STLinear", "SPNModule", "SPNBilinear", "SPNLinear", "SPNConv2d", "PHASES", "set_phase", "export_ternary",
           "import_ternary", "ternarize_fixed", "ternarize_twn", "row_mask", "current_row_mask"]
