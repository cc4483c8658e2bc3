"""strassenkit: learnable fast bilinear operators (Strassen-Tile, StrassenNets) for PyTorch.

Layers (bottom to top): ``algorithms`` <- ``functional`` <- ``nn`` <- ``surgery`` <- ``train``
<- ``cli`` / ``commands``; ``cost`` reads layers and never changes them. See ARCHITECTURE.md.
"""

from . import algorithms, cost, functional, nn, runtime, surgery, train
from .nn import STLinear
from .nn import SPNBilinear, SPNConv2d, SPNLinear, set_phase
from .nn.padding import row_mask
from .surgery import (PerModuleConfig, SPNConfig, STLConfig, calibrate_, densify_, from_pretrained, inspect_targets,
                      save_pretrained, strassenify_, unload_)
from .surgery import plan, reduce_rank_

__version__ = "0.1.0"

__all__ = ["algorithms", "functional", "nn", "surgery", "train", "cost", "runtime", "STLinear", "SPNBilinear", "SPNLinear", "SPNConv2d", "set_phase", "__version__",
           "strassenify_", "inspect_targets", "calibrate_", "densify_", "unload_", "STLConfig", "SPNConfig",
           "PerModuleConfig", "save_pretrained", "from_pretrained", "row_mask", "reduce_rank_", "plan"]
