"""Model surgery: convert layers in place (``strassenify_``), dry runs (``inspect_targets``),
pretrained conversion by least-squares calibration (``calibrate_``) and export (``densify_``).

Rooms: ``config`` (configs, each with its transform registered beside it), ``targets`` (the one
matcher: which module gets which config), ``strassenify`` (strassenify_ / inspect_targets / densify_
on top of them), ``calibrate`` (least squares on real activations).
"""

from .calibrate import CalibrationReport, calibrate_
from .config import (PerModuleConfig, SPNConfig, STLConfig, config_from_dict, config_from_json, is_config,
                     register_transform)
from .strassenify import InspectReport, densify_, inspect_targets, strassenify_
from .targets import TargetRow, is_causal_model, plan

__all__ = [
    "STLConfig",
    "SPNConfig",
    "PerModuleConfig",
    "config_from_dict",
    "config_from_json",
    "register_transform",
    "is_config",
    "strassenify_",
    "inspect_targets",
    "densify_",
    "plan",
    "is_causal_model",
    "InspectReport",
    "TargetRow",
    "calibrate_",
    "CalibrationReport",
]
