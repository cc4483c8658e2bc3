"""Model surgery: convert layers in place (``strassenify_``), dry runs (``inspect_targets``),
pretrained conversion by least-squares calibration (``calibrate_``) and export (``densify_``).

Rooms: ``config`` (configs, each with its transform registered beside it), ``targets`` (the one
matcher: which module gets which config), ``strassenify`` (strassenify_ / inspect_targets / densify_
on top of them), ``record`` (what a conversion leaves on the model: its record and the padding hook),
``pretrained`` (save/load of converted models), ``calibrate`` (least squares on real activations).
"""

from .calibrate import CalibrationReport, calibrate_
from .config import (PerModuleConfig, SPNConfig, STLConfig, config_from_dict, config_from_json, is_config,
                     register_transform)
from .pretrained import from_pretrained, save_pretrained
from .reduce_rank import RankReductionReport, reduce_rank_
from .planner import Plan, plan
from .strassenify import InspectReport, densify_, inspect_targets, strassenify_, unload_
from .targets import TargetRow, detect_causal, is_causal_model, plan_targets

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
    "unload_",
    "save_pretrained",
    "from_pretrained",
    "plan_targets",
    "is_causal_model",
    "detect_causal",
    "InspectReport",
    "TargetRow",
    "calibrate_",
    "CalibrationReport",
    "reduce_rank_",
    "RankReductionReport",
    "plan",
    "Plan",
]
