"""Model surgery: convert layers in place (``strassenify_``), dry runs (``inspect_targets``),
pretrained conversion by least-squares calibration (``calibrate_``) and export (``densify_``)."""

from .calibrate import CalibrationReport, calibrate_
from .config import SPNConfig, STLConfig, config_from_dict, config_from_json, register_transform
from .strassenify import InspectReport, densify_, inspect_targets, is_causal_model, strassenify_

__all__ = [
    "STLConfig",
    "SPNConfig",
    "config_from_dict",
    "config_from_json",
    "register_transform",
    "strassenify_",
    "inspect_targets",
    "densify_",
    "is_causal_model",
    "InspectReport",
    "calibrate_",
    "CalibrationReport",
]
