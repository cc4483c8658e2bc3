"""What a conversion leaves on the model: the record of which module got which config, and the
padding hook.

- The record (``{module name: config dict}`` plus whether the model was treated as causal) is what
  :func:`strassenkit.save_pretrained` writes, so a converted model can be rebuilt from its dense
  architecture. It lives in the root module's ``__dict__`` (no parameters, not in ``state_dict``).
- The padding hook: when a converted STL layer has ``row_tile > 1`` and the model's ``forward`` takes
  an ``attention_mask``, a forward pre-hook on the root module activates that mask as the row mask
  (:mod:`strassenkit.nn.padding`) for the duration of the call, so every STL layer zeros the padding
  rows of its input. It is installed once per model.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..nn.padding import reset_row_mask, set_row_mask

__all__ = ["note_conversion", "note_unload", "note_rank", "conversion_of", "install_row_mask_hook", "attention_mask_of",
           "has_row_mask_hook"]

_RECORD = "_strassenkit_conversion"
_HOOK = "_strassenkit_row_mask_hook"


def note_conversion(model: nn.Module, rows) -> None:
    """Add the converted rows of a :func:`strassenify_` call to the model's record; install the hook."""
    rec = model.__dict__.setdefault(_RECORD, {"version": 1, "modules": {}})
    converted = [r for r in rows if r.status == "convert" and r.target is not None]
    for r in converted:  # the configs as applied (causal models: row_tile already 1)
        rec["modules"][r.name] = r.target.to_dict()
    if any(getattr(r.target, "row_tile", 1) != 1 for r in converted):
        install_row_mask_hook(model)


def note_unload(model: nn.Module, names: list[str]) -> None:
    rec = model.__dict__.get(_RECORD)
    if rec:
        for n in names:
            rec["modules"].pop(n, None)


def note_rank(model: nn.Module, name: str, rank: int) -> None:
    """A converted STL layer got a new rank (``reduce_rank_``): the record rebuilds it with that shape.

    Its values then come from the state dict, so the recorded init becomes "random" (an exact catalogue
    init has a fixed rank).
    """
    rec = model.__dict__.get(_RECORD)
    if rec and name in rec["modules"]:
        rec["modules"][name] = {**rec["modules"][name], "rank": int(rank), "init": "random"}


def conversion_of(model: nn.Module) -> dict:
    """The record of the conversions of ``model`` that are still in place (a JSON-able dict)."""
    from ..nn import SPNModule, STLinear

    rec = model.__dict__.get(_RECORD) or {"version": 1, "modules": {}}
    mods = dict(model.named_modules())
    live = {n: c for n, c in rec["modules"].items() if isinstance(mods.get(n), (STLinear, SPNModule))}
    return {"version": rec["version"], "modules": live}


# ------------------------------------------------------------------ padding hook
def attention_mask_of(model: nn.Module, args: tuple, kwargs: dict):
    """The ``attention_mask`` argument of a call ``model(*args, **kwargs)``, or None."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    if args and isinstance(args[0], dict) and "attention_mask" in args[0]:  # model(batch) with a dict
        return args[0]["attention_mask"]
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get("attention_mask")


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def has_row_mask_hook(model: nn.Module) -> bool:
    return _HOOK in model.__dict__


def install_row_mask_hook(model: nn.Module) -> bool:
    """Make ``model(..., attention_mask=m)`` run with ``m`` as the row mask; False if forward takes no mask."""
    if has_row_mask_hook(model) or not _takes_attention_mask(model):
        return has_row_mask_hook(model)
    tokens: list = []

    def pre(module, args, kwargs):
        mask = attention_mask_of(module, args, kwargs)
        tokens.append(None)  # popped by post even if the mask is refused below
        tokens[-1] = set_row_mask(mask)

    def post(module, args, kwargs, output):
        token = tokens.pop() if tokens else None
        if token is not None:
            reset_row_mask(token)

    handles = (model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True, always_call=True))
    model.__dict__[_HOOK] = handles
    return True
