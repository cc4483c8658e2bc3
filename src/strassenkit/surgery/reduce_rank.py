"""Progressive rank reduction of STL layers: start exact, drop the least useful products, refit on data.

``reduce_rank_(model, batches, target_rank, reference=None, ...)``

The usual start is an exact conversion (``STLConfig(tile=4, rank=49, init="strassen_x_strassen")``: the
output equals the dense model's). Per layer, on the inputs it really sees (streamed normal equations of
:mod:`.calibrate`, sequentially in execution order like :func:`calibrate_`), the rank goes down in stages:

1. score every product l by how much the layer's error grows without it:
   - ``"obs"`` (Optimal Brain Surgeon, with the other products refit): with G the w_hat normal matrix,
     Delta_l = tr(w_l^T [(G^-1)_ll]^-1 w_l), exact for the w_hat refit (one inverse of G per stage);
   - ``"energy"`` (no refit): Delta_l = w_l^T G_ll w_l - 2 w_l^T (G w - H)_l, the exact increase of the squared
     error when product l is zeroed (no inverse; used for large layers by ``"auto"``);
   - ``"random"``: the baseline the data-driven criteria must beat;
2. drop the ``k`` products with the smallest scores (rows of E_x, columns of D, slices of w_hat);
3. refit w_hat by least squares (plus ``alternate`` rounds of D / E_x / w_hat steps).

Each stage ends with a least-squares w_hat fit, so the error on the calibration data never goes down as
the rank drops. With ``distill=fn``, every stage is applied to all layers, then ``fn(model, rank)`` runs
(e.g. a few distillation steps) and the next stage re-records the activations. The reduced layers are
new :class:`STLinear` modules of the smaller rank (the dense layer they replace is kept if it was).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.stlinear import STLinear
from . import record
from .calibrate import (_as_list, _dense_weight, _execution_groups, _normal_error, _solve, _stats_for, _w_normal,
                        _auto_dtype, fit_dec_stats, fit_enc_x_stats, fit_w_hat_stats)

__all__ = ["reduce_rank_", "RankReductionReport", "LayerReduction", "rank_schedule", "product_scores"]


@dataclass
class LayerReduction:
    name: str
    shape: str
    ranks: list = field(default_factory=list)  # rank after each stage (the first entry: the start)
    rel_err: list = field(default_factory=list)  # calibration-data relative error after each stage
    dropped: list = field(default_factory=list)  # original product indices dropped at each stage
    criterion: str = ""


@dataclass
class RankReductionReport:
    layers: list

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def table(self) -> str:
        head = f"{'layer':<40} {'shape':<12} {'criterion':<9} {'ranks':<24} rel.err per stage"
        lines = [head, "-" * len(head)]
        for c in self.layers:
            ranks = "->".join(str(r) for r in c.ranks)
            errs = " ".join(f"{e:.4f}" for e in c.rel_err)
            lines.append(f"{c.name[:40]:<40} {c.shape:<12} {c.criterion:<9} {ranks[:24]:<24} {errs}")
        return "\n".join(lines)


def rank_schedule(start: int, target: int, step: int | float | None = None) -> list[int]:
    """Ranks after each stage, from ``start`` down to ``target``.

    ``step``: an int drops that many products per stage; a float in (0, 1) drops that fraction of the
    current rank (at least 1); None (default) drops 1/8 of the current rank per stage.
    """
    if target > start:
        raise ValueError(f"target rank {target} is above the current rank {start}")
    if target < 1:
        raise ValueError(f"target rank must be >= 1, got {target}")
    out, r = [], start
    while r > target:
        if step is None:
            k = max(1, r // 8)
        elif isinstance(step, float):
            if not 0 < step < 1:
                raise ValueError(f"a fractional step must be in (0, 1), got {step}")
            k = max(1, int(r * step))
        else:
            k = int(step)
            if k < 1:
                raise ValueError(f"step must be >= 1, got {step}")
        r = max(target, r - k)
        out.append(r)
    return out


def product_scores(st, enc_x, w_hat, dec, ridge: float, criterion: str, rng: random.Random | None = None):
    """Score of every product (larger = more useful) from the layer's statistics; see the module docstring."""
    r, Kt = enc_x.shape[0], st.Kt
    if criterion == "random":
        rng = rng or random.Random(0)
        return torch.tensor([rng.random() for _ in range(r)], dtype=torch.float64)
    Gs, H = _w_normal(st, enc_x, dec)
    w = w_hat.to(st.dtype).reshape(r * Kt, st.Nt)
    score = torch.zeros(r, dtype=torch.float64, device=H.device)
    for G, cols in Gs:
        wc = w[:, cols]
        if criterion == "energy":
            grad = (G @ wc - H[:, cols]).view(r, Kt, -1)
            Gw = torch.stack([G[l * Kt:(l + 1) * Kt, l * Kt:(l + 1) * Kt] @ wc[l * Kt:(l + 1) * Kt] for l in range(r)])
            wl = wc.view(r, Kt, -1)
            score += ((wl * Gw).sum((1, 2)) - 2 * (wl * grad).sum((1, 2))).double()
        elif criterion == "obs":
            lam = ridge * float(torch.diagonal(G).mean())
            A = G.double() + lam * torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
            L, info = torch.linalg.cholesky_ex(A)
            Ginv = torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.pinv(A, hermitian=True)
            del A, L
            wl = wc.double().view(r, Kt, -1)
            for l in range(r):
                B = Ginv[l * Kt:(l + 1) * Kt, l * Kt:(l + 1) * Kt]
                # tr(w_l^T B^-1 w_l) via a solve (B is symmetric positive definite)
                sol = _solve(B, wl[l], 0.0)
                score[l] += float((wl[l] * sol).sum())
            del Ginv
        else:
            raise ValueError(f"criterion must be 'obs', 'energy', 'random' or 'auto', got {criterion!r}")
    return score


def _pick_criterion(criterion: str, rank: int, Kt: int, obs_limit: int) -> str:
    if criterion != "auto":
        return criterion
    return "obs" if rank * Kt <= obs_limit else "energy"


def _reduce_factors(st, enc_x, dec, w_hat, ranks, ridge, alternate, criterion, obs_limit, rng, fit_first):
    """Run the stages ``ranks`` on one layer's statistics; returns (enc_x, dec, w_hat, errors, dropped, crit)."""
    idx = list(range(enc_x.shape[0]))
    errs, dropped, crits = [], [], set()
    if fit_first:  # start from the least-squares w_hat of the current codec (exact codecs: the exact weight)
        e = []
        w_hat = fit_w_hat_stats(st, enc_x, dec, ridge, errors=e)
        errs.append(e[0][0])
    else:
        Gs, H = _w_normal(st, enc_x, dec)
        errs.append(_normal_error(st, Gs, H, w_hat)[0])
        del Gs, H
    for r_next in ranks:
        crit = _pick_criterion(criterion, enc_x.shape[0], st.Kt, obs_limit)
        crits.add(crit)
        score = product_scores(st, enc_x, w_hat, dec, ridge, crit, rng)
        k = enc_x.shape[0] - r_next
        drop = sorted(torch.argsort(score)[:k].tolist())
        keep = [i for i in range(enc_x.shape[0]) if i not in set(drop)]
        dropped.append([idx[i] for i in drop])
        idx = [idx[i] for i in keep]
        enc_x, dec, w_hat = enc_x[keep], dec[:, keep], w_hat[keep]
        e = []
        w_hat = fit_w_hat_stats(st, enc_x, dec, ridge, errors=e)
        for _ in range(alternate):
            dec = fit_dec_stats(st, enc_x, w_hat, ridge)
            enc_x = fit_enc_x_stats(st, dec, w_hat, ridge)
            e = []
            w_hat = fit_w_hat_stats(st, enc_x, dec, ridge, errors=e)
        errs.append(e[-1][0])
    return enc_x, dec, w_hat, errs, dropped, "+".join(sorted(crits)) or "-", idx


def _new_layer(old: STLinear, enc_x, dec, w_hat, kept: list[int]) -> STLinear:
    """An STLinear of the new rank holding the given factors (bias, dense original and enc_w rows carried over)."""
    r = enc_x.shape[0]
    dev, dt = old.w_hat.device, old.w_hat.dtype
    new = STLinear(old.in_features, old.out_features, bias=old.bias is not None, tile=old.tile, rank=r,
                   init="random", row_tile=old.row_tile, device=dev, dtype=dt)
    with torch.no_grad():
        new.enc_x.copy_(enc_x.to(dev, dt))
        new.dec.copy_(dec.to(dev, dt))
        new.w_hat.copy_(w_hat.to(dev, dt))
        new.enc_w.copy_(old.enc_w[kept])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.init_name = f"reduced({old.init_name})"
    if old.original is not None:
        new.keep_original(old.original)
    new.train(old.training)
    return new


def _set_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    names = []
    for n, m in list(model.named_modules(remove_duplicate=False)):
        if m is old and n:
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            names.append(n)
    return names


def reduce_rank_(
    model: nn.Module,
    batches,
    target_rank,
    reference: nn.Module | None = None,
    step: int | float | None = None,
    criterion: str = "auto",
    alternate: int = 0,
    ridge: float = 1e-6,
    layers: list[str] | None = None,
    target: str = "dense",
    dtype="auto",
    distill=None,
    obs_limit: int = 6144,
    seed: int = 0,
    progress: bool = True,
) -> RankReductionReport:
    """Reduce the rank of the STLinear layers of ``model`` to ``target_rank``, in place; returns a report.

    Args:
        model: a converted model (typically ``STLConfig(tile=4, rank=49, init="strassen_x_strassen")``,
            whose output equals the dense model's).
        batches: batches of model inputs (as for :func:`calibrate_`; padding rows of dict batches with an
            ``attention_mask`` are not fitted).
        target_rank: an int, or ``{layer name: rank}`` (layers not named keep their rank).
        reference: the dense model (targets); without it the layers' kept dense weights are used.
        step: products dropped per stage (int), a fraction of the current rank (float), or None (1/8).
        criterion: "obs", "energy", "random", or "auto" (obs while rank * ceil(K/t) <= ``obs_limit``,
            i.e. while the inverse of the normal matrix is cheap; energy above).
        alternate: extra (D, E_x, w_hat) rounds after each stage's w_hat refit.
        target, dtype: as in :func:`calibrate_`.
        distill: None (each layer is reduced to its target in one go, on one pass of statistics), or
            ``fn(model, rank)``: stages run over all layers, ``fn`` after each (e.g. a few distillation
            steps), and the next stage records activations again.
        seed: of the "random" criterion.
    """
    batches = _as_list(batches, "batches")
    stl = [(n, m) for n, m in model.named_modules() if isinstance(m, STLinear)]
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else layers
        missing = sorted(set(layers) - {n for n, _ in stl})
        if missing:
            raise KeyError(f"reduce_rank_: layers {missing} are not STLinear modules of the model")
        stl = [(n, m) for n, m in stl if n in layers]
    if isinstance(target_rank, dict):
        goal = {n: int(target_rank[n]) for n, _ in stl if n in target_rank}
    else:
        goal = {n: int(target_rank) for n, _ in stl}
    for n, m in stl:
        if n in goal and not 1 <= goal[n] <= m.rank:
            raise ValueError(f"reduce_rank_: target rank {goal[n]} for {n} must be in [1, {m.rank}] (its rank)")
    stl = [(n, m) for n, m in stl if n in goal and goal[n] < m.rank]
    reports = {n: LayerReduction(n, f"{m.in_features}->{m.out_features}", [m.rank]) for n, m in stl}
    if not stl:
        return RankReductionReport(list(reports.values()))
    weights = {n: _dense_weight(n, m, reference) for n, m in stl}
    was = model.training
    model.eval()
    if reference is not None:
        reference.eval()
    rng = random.Random(seed)
    schedules = {n: rank_schedule(m.rank, goal[n], step) for n, m in stl}
    n_stages = max(len(s) for s in schedules.values())
    stages = [None] if distill is None else list(range(n_stages))
    try:
        for stage in stages:
            current = [(n, m) for n, m in model.named_modules() if isinstance(m, STLinear) and n in schedules]
            todo = [(n, m) for n, m in current
                    if (schedules[n] if stage is None else schedules[n][stage:stage + 1])]
            if not todo:
                continue
            groups = _execution_groups(model, todo, batches[0])
            bar = tqdm(groups, desc="reduce_rank" if stage is None else f"reduce_rank stage {stage + 1}",
                       disable=not progress, leave=False)
            for group in bar:
                dt = _auto_dtype(group[0][1], dtype)
                stats = _stats_for(model, [group], batches, weights, dt, "batch", reference, target)
                for name, layer in group:
                    ranks = schedules[name] if stage is None else schedules[name][stage:stage + 1]
                    enc_x, dec, w_hat = (p.detach().to(stats[name].device, dt) for p in (layer.enc_x, layer.dec, layer.w_hat))
                    enc_x, dec, w_hat, errs, dropped, crit, kept = _reduce_factors(
                        stats[name], enc_x, dec, w_hat, ranks, ridge, alternate, criterion, obs_limit, rng,
                        fit_first=(stage is None or stage == 0))
                    new = _new_layer(layer, enc_x, dec, w_hat, kept)
                    for alias in _set_module(model, layer, new):
                        record.note_rank(model, alias, new.rank)
                    rep = reports[name]
                    if stage is None or stage == 0:
                        rep.rel_err.append(errs[0])
                    rep.ranks += ranks
                    rep.rel_err += errs[1:]
                    rep.dropped += dropped
                    rep.criterion = crit if not rep.criterion else rep.criterion
                    bar.set_postfix(layer=name, rank=new.rank, err=f"{errs[-1]:.3f}")
                del stats
            if distill is not None:
                distill(model, max(s[min(stage, len(s) - 1)] for s in schedules.values()))
    finally:
        model.train(was)
    return RankReductionReport(list(reports.values()))
