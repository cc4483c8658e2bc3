"""The tradeoff planner: per-layer configs that minimise the total calibrated error under a budget.

``plan(model, batches, budget, candidates=None, ...) -> Plan``

For every layer the conversion would touch (the same matcher as :func:`strassenify_`) and every candidate
(dense, or an STL tile/rank/init), the planner measures on real activations of the dense model

- the calibrated error: the relative error ||XW^T - STL(X)|| / ||XW^T|| after the least-squares w_hat fit
  (:func:`calibrate_`'s fast path, streamed statistics shared by all candidates of one tile format);
- the cost: linear-layer MACs incl. encode/decode (``strassenkit.cost`` on the layer, times the row tiles
  the data really has), parameters, and with ``measure_time=True`` the layer's forward time;

then picks one candidate per layer minimising ``sum_i weight_i * rel_err_i^2`` subject to the budget
(a multiple-choice knapsack, solved by dynamic programming over the budget in ``bins`` steps; costs are
rounded up, so the plan always meets the budget). Budgets (one key): ``{"flop_reduction": x}`` (total
linear MACs <= dense / x), ``{"macs": m}``, ``{"params": p}`` or ``{"param_ratio": x}`` (parameters of
the planned layers <= x * dense), ``{"time_reduction": x}`` (needs ``measure_time=True``); a plain number
means ``flop_reduction``.

``Plan.config()`` is a :class:`PerModuleConfig` that :func:`strassenify_` takes; ``Plan.table()`` is the
dry run (chosen candidate, error, MACs, parameters per layer, and the totals).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import cost as _cost
from ..nn.stlinear import STLinear
from .calibrate import (_as_list, _auto_dtype, _execution_groups, _normal_error, _stats_for, codec_ranks,
                        fit_dec_stats, fit_enc_x_stats, fit_w_hat_stats)
from .config import PerModuleConfig, STLConfig, transform_for
from .targets import plan_targets

__all__ = ["plan", "Plan", "PlanRow", "default_candidates", "solve_budget"]


def default_candidates(init: str = "als") -> list:
    """None (dense), STL t=4 at ranks 8..40 and t=2 at ranks 4..6 (``init`` family, exact ranks excluded)."""
    return ([None] + [STLConfig(tile=4, rank=r, init=init) for r in (8, 12, 16, 20, 24, 28, 32, 40)]
            + [STLConfig(tile=2, rank=r, init=init) for r in (4, 5, 6)])


def _label(cfg) -> str:
    if cfg is None:
        return "dense"
    n = cfg.row_tile if cfg.row_tile is not None else cfg.tile
    return f"t{cfg.tile}" + (f"x{n}" if n != cfg.tile else "") + f"r{cfg.rank}"


@dataclass
class PlanRow:
    name: str
    shape: str
    candidates: list  # dicts: label, config (dict or None), rel_err, macs, params, seconds
    choice: int = 0
    weight: float = 1.0

    @property
    def chosen(self) -> dict:
        return self.candidates[self.choice]


@dataclass
class Plan:
    rows: list
    budget: dict
    objective: float = 0.0
    totals: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict, repr=False)  # name -> chosen config object (or None)

    def config(self) -> PerModuleConfig:
        """The chosen configs as a :class:`PerModuleConfig` (dense layers map to None)."""
        return PerModuleConfig({r.name: self.configs[r.name] for r in self.rows})

    def summary(self) -> dict:
        return {"budget": self.budget, "objective": self.objective, "totals": self.totals,
                "choices": {r.name: r.chosen["label"] for r in self.rows},
                "layers": [{"name": r.name, "shape": r.shape, "choice": r.chosen["label"], "rel_err": r.chosen["rel_err"],
                            "macs": r.chosen["macs"], "params": r.chosen["params"]} for r in self.rows]}

    def to_dict(self) -> dict:
        return {"budget": self.budget, "objective": self.objective, "totals": self.totals,
                "rows": [{"name": r.name, "shape": r.shape, "weight": r.weight, "choice": r.choice,
                          "candidates": r.candidates} for r in self.rows]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def table(self) -> str:
        timed = any(c.get("seconds") is not None for r in self.rows for c in r.candidates)
        head = (f"{'layer':<40} {'shape':<12} {'choice':<8} {'rel.err':>8} {'MACs':>14} {'vs dense':>8} {'params':>10}"
                + (f" {'ms':>8}" if timed else "") + "  best rel.err per candidate")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            c, d = r.chosen, r.candidates[0]
            others = " ".join(f"{x['label']}:{x['rel_err']:.3f}" for x in r.candidates[1:])
            lines.append(f"{r.name[:40]:<40} {r.shape:<12} {c['label']:<8} {c['rel_err']:>8.4f} {c['macs']:>14,.0f} "
                         f"{d['macs'] / c['macs'] if c['macs'] else float('inf'):>7.2f}x {c['params']:>10,}"
                         + (f" {1000 * c['seconds']:>8.2f}" if timed else "") + f"  {others}")
        t = self.totals
        lines.append(f"total: MACs {t['macs']:,.0f} ({t['flop_reduction']:.2f}x fewer than dense {t['dense_macs']:,.0f}), "
                     f"params {t['params']:,} ({t['params'] / t['dense_params']:.2f}x dense), "
                     f"sum of weighted squared errors {self.objective:.4f}; budget {self.budget}")
        return "\n".join(lines)


# ------------------------------------------------------------------ the optimisation
def solve_budget(errors: list[list[float]], costs: list[list[float]], cap: float, bins: int = 4000) -> list[int]:
    """Multiple-choice knapsack: one option per item, minimising sum errors subject to sum costs <= cap.

    Dynamic programming over the cap in ``bins`` steps; each cost is rounded up to whole steps, so the
    result always meets the cap (it is optimal up to that rounding). Raises ValueError if no choice fits.
    """
    if len(errors) != len(costs) or any(len(e) != len(c) for e, c in zip(errors, costs)):
        raise ValueError("errors and costs must have the same shape (one list of options per item)")
    low = sum(min(c) for c in costs)
    if low > cap * (1 + 1e-12):
        raise ValueError(f"the budget cannot be met: the cheapest choice of every layer costs {low:,.6g} > {cap:,.6g}")
    unit = cap / bins if cap > 0 else 1.0
    INF = float("inf")
    dp = [0.0] + [INF] * bins  # dp[b]: least error with total discrete cost exactly b
    back = []
    for e, c in zip(errors, costs):
        w = [min(bins + 1, math.ceil(x / unit - 1e-9)) if x > 0 else 0 for x in c]
        new = [INF] * (bins + 1)
        arg = [-1] * (bins + 1)
        for b, val in enumerate(dp):
            if val == INF:
                continue
            for j, (ej, wj) in enumerate(zip(e, w)):
                nb = b + wj
                if nb <= bins and val + ej < new[nb]:
                    new[nb], arg[nb] = val + ej, j
        back.append(arg)
        dp = new
    best = min(range(bins + 1), key=lambda b: dp[b])
    if dp[best] == INF:  # only possible through rounding: the exact low bound fits but not in whole steps
        raise ValueError(f"the budget is too tight for bins={bins}; pass a larger bins=")
    choice = []
    b = best
    for i in range(len(errors) - 1, -1, -1):
        j = back[i][b]
        choice.append(j)
        c = costs[i][j]
        b -= min(bins + 1, math.ceil(c / unit - 1e-9)) if c > 0 else 0
    return choice[::-1]


# ------------------------------------------------------------------ measurement
def _layer_cost(layer: nn.Module, K: int, rows: int, tiles: int, n: int) -> tuple[float, int]:
    """(MACs on the data, parameters) of ``layer`` (strassenkit.cost on one row tile, times the row tiles)."""
    with torch.no_grad():
        p = next(layer.parameters(), None)
        rep = _cost.count(layer, torch.zeros(1, n, K, dtype=_dtype_of(layer), device=p.device if p is not None else None))
    c = rep.layers[0]
    macs = c.macs * (tiles if isinstance(layer, STLinear) else rows / n)
    return float(macs), int(c.params)


def _dtype_of(layer):
    p = next(layer.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _time_layer(layer: nn.Module, K: int, shape=(8, 128), repeats: int = 5) -> float:
    p = next(layer.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    x = torch.randn(*shape, K, dtype=_dtype_of(layer), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # GPU kernels run asynchronously
    with torch.no_grad():
        layer(x)
        ts = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            layer(x)
            sync()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _parse_budget(budget) -> tuple[str, float]:
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        budget = {"flop_reduction": float(budget)}
    if not isinstance(budget, dict) or len(budget) != 1:
        raise ValueError("budget must be one of {'flop_reduction': x}, {'macs': m}, {'params': p}, "
                         f"{{'param_ratio': x}}, {{'time_reduction': x}} (or a number = flop_reduction), got {budget!r}")
    (k, v), = budget.items()
    if k not in ("flop_reduction", "macs", "params", "param_ratio", "time_reduction"):
        raise ValueError(f"unknown budget key {k!r}; use flop_reduction, macs, params, param_ratio or time_reduction")
    if not (isinstance(v, (int, float)) and v > 0):
        raise ValueError(f"budget {k} must be a positive number, got {v!r}")
    return k, float(v)


def plan(
    model: nn.Module,
    batches,
    budget,
    candidates: list | None = None,
    targets="all-linear",
    exclude=None,
    head="auto",
    causal=None,
    init: str = "als",
    seed: int = 0,
    alternate: int = 0,
    ridge: float = 1e-4,
    weights: dict | None = None,
    measure_time: bool = False,
    heldout=None,
    dtype="auto",
    bins: int = 4000,
    progress: bool = True,
) -> Plan:
    """Measure every candidate on every targeted layer of the dense ``model`` and pick per-layer configs.

    Args:
        model: the dense model (unchanged).
        batches: batches of model inputs (as for :func:`calibrate_`; padding rows are not fitted).
        budget: see the module docstring.
        candidates: a list of configs (``None`` = keep dense, always added); default
            :func:`default_candidates` with ``init``. Configs are adjusted per layer as ``strassenify_``
            does (causal models and 2-D inputs get ``row_tile=1``).
        targets, exclude, head, causal: as for :func:`strassenify_`.
        seed: replaces the seed of candidates whose seed is 0 (the default), so seeds give different inits.
        alternate, ridge: of the least-squares fit per candidate (as in :func:`calibrate_`).
        weights: ``{layer name: weight}`` of its squared error in the objective (default 1).
        measure_time: also time each candidate layer's forward (batch 8 x 128 rows, median of 5).
        heldout: optional batches: errors are then measured there (the fit stays on ``batches``).
    """
    kind, value = _parse_budget(budget)
    if kind == "time_reduction" and not measure_time:
        raise ValueError("budget {'time_reduction': ...} needs measure_time=True")
    batches = _as_list(batches, "batches")
    heldout = _as_list(heldout, "heldout")
    cands = list(candidates) if candidates is not None else default_candidates(init)
    cands = [None] + [c for c in cands if c is not None]
    cands = [c if c is None or c.seed != 0 or not seed else c.with_(seed=seed) for c in cands]
    # per candidate, the configs strassenify_ would apply to each layer
    per: list[dict] = []
    names = None
    for c in cands[1:]:
        rows = plan_targets(model, c, targets, exclude, causal, head)
        conv = {r.name: r.target for r in rows if r.status == "convert"}
        per.append(conv)
        names = list(conv) if names is None else [n for n in names if n in conv]
    if not names:
        raise ValueError("plan: no layer of the model is targeted by the candidates")
    mods = dict(model.named_modules())
    was = model.training
    model.eval()
    # built candidate layers: name -> [layer or None] (index = candidate)
    built: dict[str, list] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            built[n] = [None] + [transform_for(conf[n])(copy.deepcopy(mods[n]), conf[n], n) for conf in per]
    # tile formats -> one streamed statistics set per (layer, format), shared by all its candidates
    formats = sorted({(b.row_tile, b.tile) for n in names for b in built[n][1:]})
    weights_ = {n: mods[n].weight.detach() if not hasattr(mods[n], "nf") else mods[n].weight.detach().T for n in names}
    errs = {n: [0.0] * len(cands) for n in names}
    macs = {n: [0.0] * len(cands) for n in names}
    params = {n: [0] * len(cands) for n in names}
    secs = {n: [None] * len(cands) for n in names}
    try:
        for fmt in formats:
            layers_f = [(n, next(b for b in built[n][1:] if (b.row_tile, b.tile) == fmt)) for n in names
                        if any((b.row_tile, b.tile) == fmt for b in built[n][1:])]
            groups = _execution_groups(model, [(n, mods[n]) for n, _ in layers_f], batches[0])
            proto = dict(layers_f)
            groups = [[(n, proto[n]) for n, _ in g] for g in groups]
            bar = tqdm(groups, desc=f"plan t={fmt[1]} n={fmt[0]}", disable=not progress, leave=False)
            for group in bar:
                dt = _auto_dtype(group[0][1], dtype)
                st = _stats_for(model, [group], batches, weights_, dt, "batch", None, "dense")
                hst = _stats_for(model, [group], heldout, weights_, dt, "heldout batch", None, "dense") if heldout else st
                for name, _ in group:
                    for j, layer in enumerate(built[name]):
                        if layer is None or (layer.row_tile, layer.tile) != fmt:
                            continue
                        errs[name][j] = _fit_error(st[name], hst[name], layer, ridge, alternate)
                        K = layer.in_features
                        tiles = sum(st[name].tiles.values())
                        macs[name][j], params[name][j] = _layer_cost(layer, K, st[name].rows, tiles, layer.row_tile)
                    if macs[name][0] == 0:
                        rows = st[name].rows
                        macs[name][0], params[name][0] = _layer_cost(mods[name], mods[name].in_features, rows, rows, 1)
                    bar.set_postfix(layer=name)
                del st, hst
        if measure_time:
            for n in names:
                for j, layer in enumerate(built[n]):
                    secs[n][j] = _time_layer(mods[n] if layer is None else layer, mods[n].in_features)
    finally:
        model.train(was)
    if alternate == 0:  # a w_hat-only fit of a rank-deficient E_x / D overstates that candidate's error
        short = sorted({_label(b) for n in names for b in built[n][1:]
                        if (lambda e, fe, d, fd: e < fe or d < fd)(*codec_ranks(b))})
        if short:
            warnings.warn(
                f"plan: candidates {short} start from encoders/decoders that miss tile directions (init {init!r}); "
                f"with alternate=0 their errors are those of a w_hat-only fit, which cannot reach those directions, "
                f"so the plan undervalues them if the final calibrate_ refits D and E_x. Pass the alternate= you "
                f"will calibrate with (e.g. 1), or candidates with another init (seed)", stacklevel=2)
    w = {n: float((weights or {}).get(n, 1.0)) for n in names}
    E = [[w[n] * errs[n][j] ** 2 for j in range(len(cands))] for n in names]
    dense_macs = sum(macs[n][0] for n in names)
    dense_params = sum(params[n][0] for n in names)
    if kind in ("flop_reduction", "macs"):
        C = [macs[n] for n in names]
        cap = dense_macs / value if kind == "flop_reduction" else value
    elif kind in ("params", "param_ratio"):
        C = [[float(p) for p in params[n]] for n in names]
        cap = value if kind == "params" else value * dense_params
    else:
        C = [secs[n] for n in names]
        cap = sum(secs[n][0] for n in names) / value
    choice = solve_budget(E, C, cap, bins)
    rows_out, configs = [], {}
    for i, n in enumerate(names):
        cand = []
        for j, c in enumerate(cands):
            conf = None if c is None else per[j - 1][n]
            cand.append({"label": _label(conf), "config": None if conf is None else conf.to_dict(),
                         "rel_err": errs[n][j], "macs": macs[n][j], "params": params[n][j], "seconds": secs[n][j]})
        rows_out.append(PlanRow(n, f"{mods[n].in_features}->{mods[n].out_features}", cand, choice[i], w[n]))
        configs[n] = None if choice[i] == 0 else per[choice[i] - 1][n]
    tot_macs = sum(macs[n][choice[i]] for i, n in enumerate(names))
    tot_params = sum(params[n][choice[i]] for i, n in enumerate(names))
    totals = {"macs": tot_macs, "dense_macs": dense_macs, "flop_reduction": dense_macs / tot_macs if tot_macs else float("inf"),
              "params": tot_params, "dense_params": dense_params}
    if measure_time:
        totals["seconds"] = sum(secs[n][choice[i]] for i, n in enumerate(names))
        totals["dense_seconds"] = sum(secs[n][0] for n in names)
    objective = sum(E[i][choice[i]] for i in range(len(names)))
    return Plan(rows_out, {kind: value}, objective, totals, configs)


def _fit_error(st, hst, layer: STLinear, ridge: float, alternate: int) -> float:
    dt = st.dtype
    enc_x, dec = layer.enc_x.detach().to(dt), layer.dec.detach().to(dt)
    w_hat = fit_w_hat_stats(st, enc_x, dec, ridge)
    for _ in range(alternate):
        dec = fit_dec_stats(st, enc_x, w_hat, ridge)
        enc_x = fit_enc_x_stats(st, dec, w_hat, ridge)
        w_hat = fit_w_hat_stats(st, enc_x, dec, ridge)
    from .calibrate import _w_normal

    Gs, H = _w_normal(hst, enc_x, dec)
    return _normal_error(hst, Gs, H, w_hat)[0]
