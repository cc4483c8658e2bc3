"""Target matching: which modules of a model a conversion touches, and with which config.

This is the one matcher (as PEFT's ``tuners_utils``): :func:`plan_targets` walks the model once and returns a
:class:`TargetRow` per relevant module, with a status and, for the modules to convert, the config to
apply (already adjusted for causal models). It changes nothing; :func:`strassenify_` and
:func:`inspect_targets` build on it.

Targets:
- ``"all-linear"``: every module of a type the config supports (STLConfig: nn.Linear; SPNConfig:
  nn.Linear and nn.Conv2d), except the output head (see ``head``);
- a module name or a list of names: exact (``"blocks.0.mlp.fc1"``) or a suffix on a ``.`` boundary
  (``"fc1"`` matches every ``*.fc1``);
- ``"re:<regex>"``: names that the regex matches in full (``re.fullmatch``);
- per-layer configs: a :class:`PerModuleConfig` (or a plain dict) as ``config``, or a dict as
  ``targets`` with ``config=None``.
``exclude`` takes the same names / suffixes / regexes and always wins. ``filter_fn(module, fqn) -> bool``
(torchao's convention) must also return True for a module to be converted.

Output head (``head``): "auto" excludes, from "all-linear" only, ``model.get_output_embeddings()``
when the model has it, else modules whose last name component is one of ``lm_head, head,
classifier, fc_out, output``, else the last nn.Linear in registration order. ``head=None`` keeps
it in, a name (or list) names it explicitly. A head that is named in ``targets`` is converted.

Causal models: see :func:`is_causal_model` and :func:`causal_config`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import SPNModule, STLinear
from ..nn.stlinear import is_linear_like
from .config import PerModuleConfig, STLConfig, is_config, supported_types, supports, transform_for

__all__ = ["TargetRow", "plan_targets", "match", "patterns", "is_causal_model", "detect_causal", "resolve_causal", "find_heads",
           "causal_config", "as_per_module", "ENCODER_MODEL_TYPES"]

HEAD_NAMES = ("lm_head", "head", "classifier", "fc_out", "output")


def _convertible(m: nn.Module) -> bool:
    """Module kinds that get a row even when not targeted: Linear (and transformers' Conv1D), Conv2d."""
    return isinstance(m, nn.Conv2d) or is_linear_like(m)


@dataclass
class TargetRow:
    """One module considered by a conversion (a row of :class:`InspectReport`).

    ``target`` is the config to apply (set only when ``status == "convert"``); ``config`` is its dict.
    """

    name: str
    module_type: str
    shape: str
    status: str  # "convert", "skipped", "excluded", "head", "unsupported", "not-targeted"
    config: dict | None = None
    reason: str = ""
    new_type: str = ""
    cost: dict = field(default_factory=dict)
    target: object = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "target"}


def match(key: str, name: str) -> bool:
    """True if pattern ``key`` (exact name, ``.``-suffix, or ``"re:<regex>"``) matches module ``name``."""
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return name == key or name.endswith("." + key)


def patterns(arg, what: str) -> list[str]:
    """``arg`` (None, a pattern, or a list of patterns) as a list; regexes are checked here."""
    if arg is None:
        return []
    if isinstance(arg, str):
        out = [arg]
    elif isinstance(arg, (list, tuple, set)) and all(isinstance(a, str) for a in arg):
        out = list(arg)
    else:
        raise TypeError(f"{what} must be a name, 're:<regex>', or a list of them, got {arg!r}")
    for p in out:
        _check_regex(p)
    return out


def _check_regex(p: str) -> None:
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"invalid regex {p!r}: {e}") from None


# model_type values of Hugging Face configs (transformers 4 and 5) that are encoder-only: bidirectional,
# so STL tiles may span tokens. Anything else from Hugging Face without a clear sign is treated as causal.
ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "camembert", "mpnet", "ernie", "nezha", "megatron-bert", "mobilebert", "squeezebert", "funnel", "longformer",
    "big_bird", "luke", "rembert", "roformer", "xlm", "flaubert", "layoutlm", "layoutlmv2", "layoutlmv3",
    "canine", "esm", "modernbert", "nomic_bert", "jina_bert", "data2vec-text", "vit", "deit", "beit", "swin",
    "swinv2", "convnext", "convnextv2", "dinov2", "vit_mae", "vit_msn", "yolos", "segformer", "mobilevit",
    "dpt", "siglip_vision_model", "clip_vision_model", "wav2vec2", "hubert", "wavlm", "data2vec-audio",
    "data2vec-vision", "audio-spectrogram-transformer",
})


def detect_causal(model: nn.Module) -> tuple[bool, str, bool]:
    """(causal, why, sure): does ``model`` forbid a token from seeing later tokens?

    Causal if any of: ``model.is_causal`` is True; the class is a causal / seq2seq LM (``*ForCausalLM``,
    ``*LMHeadModel``, ``*ForConditionalGeneration``); the config says so (``is_decoder``, ``is_causal``,
    ``is_encoder_decoder``, a causal ``architectures`` entry); any attention submodule has
    ``is_causal=True``. Not causal if attention submodules say ``is_causal=False`` or the config's
    ``model_type`` is a known encoder. A Hugging Face model with none of these signs is treated as
    causal (``sure=False``), the safe choice; a plain nn.Module without signs is not causal.
    """
    if getattr(model, "is_causal", None) is True:
        return True, "model.is_causal is True", True
    cls = type(model).__name__
    if cls.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return True, f"class {cls} is a causal language model", True
    cfg = getattr(model, "config", None)
    get = (cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))) if cfg is not None else None
    if get is not None:
        for flag in ("is_decoder", "is_causal", "is_encoder_decoder"):
            if get(flag, False) is True:
                return True, f"config.{flag} is True", True
        archs = get("architectures", None) or []
        for a in archs:
            if isinstance(a, str) and any(k in a for k in ("CausalLM", "LMHeadModel", "ConditionalGeneration")):
                return True, f"config.architectures has {a}", True
    flags = [(n, m.is_causal) for n, m in model.named_modules()
             if m is not model and isinstance(getattr(m, "is_causal", None), bool)]
    causal_mods = [n for n, c in flags if c]
    if causal_mods:
        return True, f"attention module {causal_mods[0]} has is_causal=True", True
    if flags:
        return False, f"attention modules ({flags[0][0]}, ...) have is_causal=False", True
    model_type = get("model_type", None) if get is not None else None
    if model_type in ENCODER_MODEL_TYPES:
        return False, f"config.model_type {model_type!r} is an encoder", True
    if get is not None and model_type is not None:
        return True, f"config.model_type {model_type!r} gives no sign either way; treated as causal (the safe choice)", False
    return False, "no sign of causal attention (plain module)", True


def is_causal_model(model: nn.Module) -> bool:
    """True if :func:`detect_causal` finds (or, unsure, assumes) that the model is autoregressive."""
    return detect_causal(model)[0]


def resolve_causal(model: nn.Module, causal) -> bool:
    """``causal`` argument of strassenify_: None detects (warning when unsure), True/False is the user's word."""
    if causal is None:
        is_causal, why, sure = detect_causal(model)
        if not sure:
            warnings.warn(f"strassenify_: could not tell whether {type(model).__name__} is causal ({why}); STL layers get "
                          f"row_tile=1. Pass causal=False if tokens may see later tokens (an encoder)", stacklevel=4)
        return is_causal
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be None (detect), True or False, got {causal!r}")
    return causal


def causal_config(config, name: str, causal: bool):
    """The config to use for module ``name``: causal models get STL ``row_tile=1`` (more raises)."""
    if not causal or not isinstance(config, STLConfig):
        return config
    if config.row_tile is None:
        return config.with_(row_tile=1)
    if config.row_tile != 1:
        raise ValueError(
            f"{name}: causal model but STLConfig(row_tile={config.row_tile}): a {config.row_tile}x{config.tile} "
            f"activation tile mixes {config.row_tile} consecutive tokens, so earlier positions would see later ones. "
            f"Use STLConfig(row_tile=1) (or row_tile=None, which becomes 1 for causal models)"
        )
    return config


def find_heads(model: nn.Module, head) -> set[str]:
    """Names of the output head(s) that "all-linear" keeps dense (see the module docstring)."""
    if head is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    if head != "auto":
        pats = patterns(head, "head")
        found = {n for n, _ in model.named_modules() if n and any(match(p, n) for p in pats)}
        if not found:
            warnings.warn(f"head={head!r} matched no module of the model", stacklevel=4)
        return found
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except Exception:  # noqa: BLE001 - a model may not implement it
            out = None
        if isinstance(out, nn.Module) and id(out) in names:
            return {names[id(out)]}
        if out is None and getattr(model, "config", None) is not None:
            # a Hugging Face model that says it has no output embeddings (e.g. BertModel, LlamaModel): its
            # pooler and last MLP are ordinary layers; only a classifier-style head by name stays dense
            return {n for n, m in model.named_modules() if n and n.split(".")[-1] in HEAD_NAMES and _convertible(m)}
    by_name = {n for n, m in model.named_modules() if n and n.split(".")[-1] in HEAD_NAMES and _convertible(m)}
    if by_name:
        return by_name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {linears[-1]} if linears else set()


def shape_of(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"{m.in_features}->{m.out_features}"
    if isinstance(m, nn.Conv2d):
        return f"{m.in_channels}->{m.out_channels} k{tuple(m.kernel_size)} s{tuple(m.stride)} g{m.groups}"
    if isinstance(m, STLinear):
        return f"{m.in_features}->{m.out_features} <{m.row_tile},{m.tile},{m.tile}> r{m.rank}"
    if is_linear_like(m):  # transformers Conv1D: weight (in, out)
        return f"{m.weight.shape[0]}->{m.weight.shape[1]}"
    return ""


def as_per_module(config, targets):
    """Normalise (config, targets): per-layer dicts become a :class:`PerModuleConfig`; checks types."""
    if isinstance(config, dict):
        config = PerModuleConfig(config)
    if isinstance(targets, dict):
        if config is not None:
            raise ValueError("targets is a {name: config} mapping, so config must be None (or pass the mapping as config)")
        config, targets = PerModuleConfig(targets), "all-linear"
    if config is None:
        raise ValueError("config is None: pass a config (STLConfig(...) / SPNConfig(...)) or a {name: config} mapping")
    if isinstance(config, PerModuleConfig):
        for k in config.configs:
            _check_regex(k)
    elif not is_config(config):
        raise TypeError(f"config must be a registered config such as STLConfig or SPNConfig, got {type(config).__name__}")
    else:
        transform_for(config)
    return config, targets


def _rule(config, name: str, module: nn.Module, all_linear: bool, pats: list[str]):
    """(config or None, explicit, row reason or None): what the targets say about one module.

    Returns (None, False, None) for a module no rule mentions, (None, True, reason) for one a
    per-module mapping maps to None.
    """
    if isinstance(config, PerModuleConfig):
        mapping = config.configs
        if name in mapping:
            cfg = mapping[name]
        else:
            cfg = next((v for k, v in mapping.items() if match(k, name)), _MISSING)
            if cfg is _MISSING:
                return None, False, None
        return (cfg, True, None) if cfg is not None else (None, True, "targets mapping gives None")
    if all_linear:
        return (config, False, None) if supports(config, module) else (None, False, None)
    return (config, True, None) if any(match(p, name) for p in pats) else (None, False, None)


_MISSING = object()


def _may_use_stl(config) -> bool:
    if isinstance(config, PerModuleConfig):
        return any(isinstance(c, STLConfig) for c in config.configs.values())
    return isinstance(config, STLConfig)


def _tied_to_embeddings(model: nn.Module) -> dict[str, str]:
    """{module name: embedding name} for modules whose weight is the weight of an nn.Embedding."""
    emb = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {n: emb[id(m.weight)] for n, m in model.named_modules()
            if not isinstance(m, nn.Embedding) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and id(m.weight) in emb}


def _tied_between_modules(model: nn.Module) -> dict[str, list[str]]:
    """{module name: other modules' names} for convertible modules holding a parameter another module holds too.

    (A module registered under two names is one module, not a tie: it is converted once and stays shared.)
    """
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():  # each module once, under its first name
        if n and not isinstance(m, nn.Embedding):
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), []).append(n)
    out: dict[str, list[str]] = {}
    for names in owners.values():
        for n in names if len(names) > 1 else ():
            out.setdefault(n, []).extend(o for o in names if o != n and o not in out.get(n, []))
    return out


def _peft_layers(model: nn.Module) -> list[str]:
    """Names of PEFT tuner layers (LoRA & co.: their class derives from peft's BaseTunerLayer)."""
    return [n for n, m in model.named_modules()
            if n and any(k.__name__ == "BaseTunerLayer" for k in type(m).__mro__)]


def probe_input_dims(model: nn.Module) -> dict[str, int]:
    """{module name: input ndim} of linear layers, from one forward pass on ``model.dummy_inputs``.

    Hugging Face models carry tiny dummy inputs; the pass shows which linears see (batch, features)
    rows with no sequence axis (e.g. BertPooler.dense gets the [CLS] vectors): their rows are
    samples, so STL gives them ``row_tile=1``. Other models (or a failing pass): {}.
    """
    dummy = getattr(model, "dummy_inputs", None)
    if not isinstance(dummy, dict) or not dummy:
        return {}
    dims: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if name and is_linear_like(m):
            def hook(mod, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    dims[name] = min(dims.get(name, 99), args[0].dim())
            handles.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(**dummy)
    except Exception:  # noqa: BLE001 - a probe only: without it nothing is adjusted
        return {}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return dims


def rows_config(config, name: str, ndim: int | None):
    """STL layers whose inputs have no sequence axis (2-D) get ``row_tile=1``; an explicit taller tile raises."""
    if ndim is None or ndim > 2 or not isinstance(config, STLConfig):
        return config
    if config.row_tile is None:
        return config.with_(row_tile=1)
    if config.row_tile != 1:
        raise ValueError(
            f"{name}: this layer gets {ndim}-D inputs (batch, features) on the model's dummy inputs, so a "
            f"{config.row_tile}-row tile would mix samples. Use STLConfig(row_tile=1) (or row_tile=None) for it"
        )
    return config


def plan_targets(model: nn.Module, config, targets="all-linear", exclude=None, causal=None, head="auto",
         filter_fn=None) -> list[TargetRow]:
    """Decide, for every relevant module, whether and how it is converted (changes nothing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool, got {type(filter_fn).__name__}")
    config, targets = as_per_module(config, targets)
    all_linear = isinstance(targets, str) and targets in ("all-linear", "all")
    per_module = isinstance(config, PerModuleConfig)
    pats = [] if (per_module or all_linear) else patterns(targets, "targets")
    excl = patterns(exclude, "exclude")
    heads = find_heads(model, head) if all_linear else set()
    causal = resolve_causal(model, causal)
    tied = _tied_to_embeddings(model)
    dims = probe_input_dims(model) if _may_use_stl(config) else {}
    tied_modules = _tied_between_modules(model)
    adapters = _peft_layers(model)
    mha_children = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_children()}

    rows: list[TargetRow] = []
    for name, module in model.named_modules():
        if not name:
            continue
        cfg, explicit, skip_reason = _rule(config, name, module, all_linear, pats)

        def row(status, reason="", config_dict=None):
            return TargetRow(name, type(module).__name__, shape_of(module), status, config_dict, reason)

        if skip_reason:
            rows.append(row("skipped", skip_reason))
            continue
        if cfg is None:
            if _convertible(module):
                reason = (f"{type(config).__name__} does not convert {type(module).__name__}" if all_linear else "")
                rows.append(row("not-targeted", reason))
            continue
        if filter_fn is not None and not filter_fn(module, name):
            if _convertible(module):
                rows.append(row("not-targeted", "filter_fn returned False"))
            continue
        kinds = supported_types(cfg)
        ok = supports(cfg, module)
        if not ok and next(module.children(), None) is not None:
            continue  # a container matched by a name pattern: its children are considered on their own
        r = row("convert", config_dict=cfg.to_dict())
        if any(match(p, name) for p in excl):
            r.status, r.reason = "excluded", "matched exclude"
        elif name in tied:
            r.status, r.reason = "skipped", (f"weight tied to the input embedding {tied[name]}; tied output embeddings are "
                                             f"never converted (the embedding must stay a lookup table)")
        elif name in tied_modules:
            r.status, r.reason = "unsupported", (
                f"shares a weight with {', '.join(tied_modules[name])}: converting would untie them into independent "
                f"layers; skipped (register one module under both names to convert it once, shared)")
        elif any(name == a or name.startswith(a + ".") for a in adapters):
            r.status, r.reason = "skipped", ("inside a PEFT adapter layer: adapters are left alone; merge them first "
                                             "(model.merge_and_unload()) to convert the base layer")
        elif name in heads and not explicit:
            r.status, r.reason = "head", "output head kept dense (pass head=None to convert it)"
        elif not ok and isinstance(module, (STLinear, SPNModule)):
            r.status, r.reason = "skipped", f"already converted ({type(module).__name__})"
        elif not ok:
            r.status = "unsupported"
            r.reason = (f"{type(module).__name__} is not supported by {type(cfg).__name__} (it converts "
                        f"{', '.join(t.__name__ for t in kinds)}); skipped")
        elif name in mha_children:
            r.status = "unsupported"
            r.reason = ("inside nn.MultiheadAttention, which reads out_proj.weight directly instead of calling it; "
                        "skipped (write attention with separate nn.Linear projections to convert it)")
        else:
            r.target = rows_config(causal_config(cfg, name, causal), name, dims.get(name))
            r.config = r.target.to_dict()
        rows.append(r)
    return rows
