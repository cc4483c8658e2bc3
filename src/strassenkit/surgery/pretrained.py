"""Save and load converted models: ``sk.save_pretrained(model, path)``, ``sk.from_pretrained(path, cls)``.

A saved folder holds:

- ``strassenkit.json``: the conversion (which module got which config, versioned), written from the
  record :func:`strassenify_` leaves on the model (:mod:`.record`);
- ``strassenkit.safetensors``: the whole ``state_dict`` of the converted model (shared tensors once);
- for Hugging Face models, the model's own ``config.json`` (and generation config), with a
  ``"strassenkit"`` entry that says how to load the folder.

The weights deliberately do not use transformers' file names: ``BertModel.from_pretrained(path)``
fails loudly (no weights file) instead of silently building dense layers with random weights.
``from_pretrained`` rebuilds the dense architecture (from the folder's ``config.json`` for Hugging
Face classes, or ``cls()`` for any other callable), converts exactly the recorded modules, and loads
every tensor strictly, so outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from .config import PerModuleConfig, config_from_dict
from .record import conversion_of

__all__ = ["save_pretrained", "from_pretrained", "CONVERSION_FILE", "WEIGHTS_FILE"]

CONVERSION_FILE = "strassenkit.json"
WEIGHTS_FILE = "strassenkit.safetensors"
FORMAT_VERSION = 1


def save_pretrained(model: nn.Module, path) -> Path:
    """Write ``model`` (converted by strassenify_) to folder ``path``; returns the folder."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    conv = conversion_of(model)
    if not conv["modules"]:
        raise ValueError("save_pretrained: the model holds no layer converted by strassenify_; save it with its own "
                         "save_pretrained / torch.save instead")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "weights": WEIGHTS_FILE, **conv}
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.strassenkit = {"load_with": "strassenkit.from_pretrained(path, model_class)",
                                 "conversion": CONVERSION_FILE, "format_version": FORMAT_VERSION}
        try:
            hf_config.save_pretrained(out)
        finally:
            del hf_config.strassenkit
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(out)
    tmp = out / (WEIGHTS_FILE + f".tmp{os.getpid()}")
    save_model(model, str(tmp), metadata={"strassenkit_format": str(FORMAT_VERSION)})
    os.replace(tmp, out / WEIGHTS_FILE)
    (out / CONVERSION_FILE).write_text(json.dumps(meta, indent=1))
    return out


def _read_conversion(folder: Path) -> dict:
    f = folder / CONVERSION_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{folder} has no {CONVERSION_FILE}: it was not written by strassenkit.save_pretrained "
                                f"(a plain dense checkpoint loads with its own from_pretrained)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict):
        raise ValueError(f"{f} has no 'modules' mapping; it is not a strassenkit conversion record")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{f} has format_version {meta['format_version']}; this strassenkit reads up to "
                         f"{FORMAT_VERSION}: upgrade strassenkit")
    return meta


def _rebuild_config(d: dict):
    """The recorded config, made cheap to rebuild: every tensor is loaded from the weights file anyway."""
    cfg = config_from_dict(d)
    if type(cfg).__name__ == "STLConfig":
        cfg = cfg.with_(init="random", keep_dense_weight=False)  # no ALS search, no stale dense weights
    return cfg


def _build_dense(folder: Path, model_class, kwargs) -> nn.Module:
    if hasattr(model_class, "config_class") or hasattr(model_class, "from_config"):  # Hugging Face classes
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        if hasattr(config, "strassenkit"):
            del config.strassenkit
        # AutoModel* classes have from_config; a concrete PreTrainedModel class is built from its config
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config, **kwargs)
        return model_class(config, **kwargs)
    if callable(model_class):
        return model_class(**kwargs)
    raise TypeError(f"model_class must be a Hugging Face model class or a callable returning the dense model, "
                    f"got {model_class!r}")


def from_pretrained(path, model_class, **kwargs) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` (in eval mode).

    Args:
        path: the folder.
        model_class: a Hugging Face model class (``BertModel``, ``AutoModel``, ...: built from the
            folder's ``config.json``) or any callable that returns the dense model.
        kwargs: passed to ``from_config`` / the class / the callable.
    """
    folder = Path(path)
    meta = _read_conversion(folder)
    weights = folder / meta.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the folder is incomplete")
    model = _build_dense(folder, model_class, kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_class built a {type(model).__name__}, not an nn.Module")
    from .strassenify import strassenify_

    missing = sorted(set(meta["modules"]) - {n for n, _ in model.named_modules()})
    if missing:
        raise ValueError(f"{folder}: the rebuilt {type(model).__name__} has no module(s) {missing[:5]}; pass the model "
                         f"class the folder was saved from ({meta.get('model_class')})")
    # exact names (as anchored regexes, so a key never matches a longer name by suffix); configs as applied
    per_module = {"re:" + re.escape(name): _rebuild_config(d) for name, d in meta["modules"].items()}
    strassenify_(model, PerModuleConfig(per_module), head=None, causal=False)
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{weights}: the weights do not match the rebuilt model: {e}") from None
    model.eval()
    return model
