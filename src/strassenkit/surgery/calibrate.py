"""Pretrained conversion: fit converted STL layers to the activations they really see.

For an STLinear layer with tile format <n,t,t> (n = row_tile), rank r, input x (..., L, K) and the
dense weight W (N, K) it replaces, the target is Y = x W^T (bias excluded: the layer keeps the dense
bias). In tile notation (A row tiles over all samples, Kt = K/t, Nt = N/t):

    Xt[a, ij, c]   = x[a*n+i, c*t+j]                         (A, n*t, Kt)
    x_hat[l, a, c] = sum_ij E_x[l, ij] Xt[a, ij, c]          (r, A, Kt)
    P[l, a, b]     = sum_c x_hat[l, a, c] w_hat[l, c, b]      (r, A, Nt)
    Yhat[a, ik, b] = sum_l D[ik, l] P[l, a, b]                (A, n*t, Nt)

Yhat is linear in w_hat, and every output column block b has the same design matrix, so the least
squares fit of w_hat given (E_x, D) is one symmetric solve with Nt right-hand sides. Normal equations
(unknowns indexed (l, c), r*Kt of them):

    G[(l,c), (l',c')] = sum_a (D_a^T D_a)[l, l'] x_hat[l, a, c] x_hat[l', a, c']
    H[(l,c), b]       = sum_a x_hat[l, a, c] (D^T Yt[a])[l, b]

where D_a keeps the decoder rows of the real (non-padding) rows of tile a. Yhat is also linear in D
(given E_x, w_hat; one r x r solve per output row of the tile) and in E_x (given D, w_hat; unknowns
(l, ij), r*n*t of them), so ``alternate=k`` runs k rounds of D-step, E_x-step, w_hat-step; each step
minimizes the same objective exactly (up to the small ridge), so the error never goes up.

:func:`fit_w_hat_reference` is the slow path (explicit design matrix by autograd + torch.linalg.lstsq)
that the tests compare against. The normal-equation matrix has (r*Kt)^2 entries in float64: for
t=4, r=24 that is 8 * (6K)^2 bytes, e.g. 21 MB at K=384 and 340 MB at K=1536.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._utils import check_int
from ..nn.padding import current_row_mask, row_mask
from ..nn.stlinear import STLinear
from .record import attention_mask_of

__all__ = ["calibrate_", "CalibrationReport", "LayerCalibration", "TileData", "fit_w_hat", "fit_w_hat_reference",
           "fit_dec", "fit_enc_x", "tile_error"]


# ------------------------------------------------------------------ data in tile layout
@dataclass
class TileData:
    """Recorded inputs and targets of one layer in tile layout (float64).

    Xt: (A, n*t, Kt) input tiles; Yt: (A, n*t, Nt) target tiles (zero on padding);
    valid: (A,) number of real rows in each row tile (n except at a sequence end);
    last_cols: real output columns in the last column block (t unless N % t != 0).
    Padding rows and columns are excluded from every objective (the layer slices them away).
    """

    Xt: torch.Tensor
    Yt: torch.Tensor
    valid: torch.Tensor
    n: int
    t: int
    last_cols: int

    @classmethod
    def from_activations(cls, xs: list[torch.Tensor], ys: list[torch.Tensor], n: int, t: int,
                         masks: list[torch.Tensor | None] | None = None) -> "TileData":
        """xs: inputs (..., L, K); ys: targets (..., L, N) (2-D inputs are one row per sample).

        masks: optional (B, L) real-row masks per input (right padding for n > 1): padding rows are
        zeroed (as the layer's forward does) and excluded from the fit; tiles without real rows are dropped.
        """
        Xs, Ys, Vs = [], [], []
        N = None
        masks = masks if masks is not None else [None] * len(xs)
        for x, y, m in zip(xs, ys, masks):
            if x.dim() == 1:
                x, y = x[None], y[None]
            if x.dim() == 2:  # (batch, K): one row per sample (only valid for row_tile == 1)
                x, y = x[:, None, :], y[:, None, :]
                m = None
            K, N = x.shape[-1], y.shape[-1]
            L = x.shape[-2]
            real = None
            if m is not None and tuple(m.shape) == tuple(x.shape[:-1]):
                real = m.reshape(-1, L).to(device=x.device, dtype=torch.bool)
            x = x.reshape(-1, L, K).double()
            y = y.reshape(-1, L, N).double()
            if real is not None:
                x = x * real[..., None]
                y = y * real[..., None]
            B = x.shape[0]
            Mt, Kt, Nt = math.ceil(L / n), math.ceil(K / t), math.ceil(N / t)
            xp = F.pad(x, (0, Kt * t - K, 0, Mt * n - L))
            yp = F.pad(y, (0, Nt * t - N, 0, Mt * n - L))
            X = xp.reshape(B, Mt, n, Kt, t).permute(0, 1, 2, 4, 3).reshape(B * Mt, n * t, Kt)
            Y = yp.reshape(B, Mt, n, Nt, t).permute(0, 1, 2, 4, 3).reshape(B * Mt, n * t, Nt)
            if real is None:
                v = torch.full((Mt,), n, dtype=torch.long)
                v[-1] = L - (Mt - 1) * n
                v = v.repeat(B)
            else:
                v = F.pad(real.long(), (0, Mt * n - L)).reshape(B * Mt, n).sum(1).cpu()
                keep = v > 0
                X, Y, v = X[keep], Y[keep], v[keep]
            Xs.append(X)
            Ys.append(Y)
            Vs.append(v)
        return cls(torch.cat(Xs), torch.cat(Ys), torch.cat(Vs), n, t, N - (math.ceil(N / t) - 1) * t)

    def mask(self) -> torch.Tensor:
        """(A, n*t, Nt) float mask: 1 on output entries of real rows and columns."""
        i = torch.arange(self.n).repeat_interleave(self.t)
        k = torch.arange(self.t).repeat(self.n)
        Nt = self.Yt.shape[2]
        rows = i[None, :] < self.valid[:, None]  # (A, e)
        cols = torch.ones(self.n * self.t, Nt, dtype=torch.bool)
        cols[:, -1] = k < self.last_cols
        return (rows[:, :, None] & cols[None]).double()

    def col_blocks(self):
        """Yield (b slice, real columns per tile) for column blocks with the same mask."""
        Nt = self.Yt.shape[2]
        if self.last_cols == self.t:
            yield slice(0, Nt), self.t
        else:
            if Nt > 1:
                yield slice(0, Nt - 1), self.t
            yield slice(Nt - 1, Nt), self.last_cols


def _dtd(dec: torch.Tensor, n: int, t: int, v: int, kv: int) -> torch.Tensor:
    """D_sub^T D_sub over decoder rows (i, k) with i < v real rows and k < kv real columns."""
    r = dec.shape[1]
    sub = dec.reshape(n, t, r)[:v, :kv].reshape(-1, r)
    return sub.T @ sub


def _predict(d: TileData, enc_x, w_hat, dec) -> torch.Tensor:
    x_hat = torch.einsum("lj,ajc->lac", enc_x, d.Xt)
    P = torch.bmm(x_hat, w_hat)
    return torch.einsum("el,lab->aeb", dec, P)


def tile_error(d: TileData, enc_x, w_hat, dec) -> tuple[float, float]:
    """(relative Frobenius error, SQNR in dB) of the STL output against the target on real entries."""
    diff = (_predict(d, enc_x.double(), w_hat.double(), dec.double()) - d.Yt) * d.mask()
    num = float(diff.pow(2).sum())
    den = float(d.Yt.pow(2).sum())
    rel = math.sqrt(num / den) if den > 0 else float("nan")
    sqnr = 10 * math.log10(den / num) if num > 0 else float("inf")
    return rel, sqnr


def _groups(d: TileData):
    """Yield (valid_rows, index tensor) for each distinct number of real rows per tile."""
    for v in torch.unique(d.valid).tolist():
        yield int(v), torch.nonzero(d.valid == v).squeeze(1)


def _solve(G: torch.Tensor, H: torch.Tensor, ridge: float) -> torch.Tensor:
    dim = G.shape[0]
    lam = ridge * float(torch.diagonal(G).mean()) if dim else 0.0
    A = G + lam * torch.eye(dim, dtype=G.dtype)
    try:
        L = torch.linalg.cholesky(A)
        return torch.cholesky_solve(H, L)
    except RuntimeError:  # singular: minimum-norm least squares
        return torch.linalg.lstsq(A, H, driver="gelsd").solution


def fit_w_hat(d: TileData, enc_x: torch.Tensor, dec: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """Least-squares w_hat (r, Kt, Nt) given E_x (r, n*t) and D (n*t, r), via the normal equations."""
    enc_x, dec = enc_x.double(), dec.double()
    r, Kt, Nt = enc_x.shape[0], d.Xt.shape[2], d.Yt.shape[2]
    Q = torch.einsum("el,aeb->lab", dec, d.Yt)  # padding of Yt is zero
    x_hat = torch.einsum("lj,ajc->lac", enc_x, d.Xt)
    H = torch.einsum("lac,lab->lcb", x_hat, Q).reshape(r * Kt, Nt)
    S = {}
    for v, idx in _groups(d):
        xa = x_hat[:, idx, :].permute(1, 0, 2).reshape(len(idx), r * Kt)
        S[v] = xa.T @ xa
    out = torch.empty(r * Kt, Nt, dtype=torch.float64)
    for cols, kv in d.col_blocks():
        G = torch.zeros(r * Kt, r * Kt, dtype=torch.float64)
        for v, Sv in S.items():
            G += Sv * _dtd(dec, d.n, d.t, v, kv).repeat_interleave(Kt, 0).repeat_interleave(Kt, 1)
        out[:, cols] = _solve(G, H[:, cols], ridge)
    return out.reshape(r, Kt, Nt)


def fit_w_hat_reference(d: TileData, enc_x: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """Slow path: per output column block, the explicit design matrix (autograd Jacobian) and lstsq."""
    enc_x, dec = enc_x.double(), dec.double()
    r, Kt, Nt = enc_x.shape[0], d.Xt.shape[2], d.Yt.shape[2]
    mask = d.mask().bool()  # (A, n*t, Nt)
    out = torch.empty(r, Kt, Nt, dtype=torch.float64)
    for b in range(Nt):
        mb = mask[:, :, b]

        def f(w_col):  # w_col (r, Kt) -> real outputs of column block b
            return _predict(d, enc_x, w_col[..., None], dec)[..., 0][mb]

        Z = torch.autograd.functional.jacobian(f, torch.zeros(r, Kt, dtype=torch.float64)).reshape(-1, r * Kt)
        out[:, :, b] = torch.linalg.lstsq(Z, d.Yt[:, :, b][mb][:, None], driver="gelsd").solution.reshape(r, Kt)
    return out


def fit_dec(d: TileData, enc_x: torch.Tensor, w_hat: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """Least-squares D (n*t, r) given E_x and w_hat: one r x r solve per output row (i, k) class."""
    enc_x, w_hat = enc_x.double(), w_hat.double()
    P = torch.bmm(torch.einsum("lj,ajc->lac", enc_x, d.Xt), w_hat)  # (r, A, Nt)
    r, t, Nt = P.shape[0], d.t, P.shape[2]
    dec = torch.zeros(d.n * t, r, dtype=torch.float64)
    for i in range(d.n):
        sel = d.valid > i
        Pi = P[:, sel, :]  # (r, a, Nt)
        Yi = d.Yt[sel][:, i * t:(i + 1) * t, :]  # (a, t, Nt)
        # k < last_cols: every column block; k >= last_cols: all but the last block
        for ks, blocks in ((slice(0, d.last_cols), slice(0, Nt)), (slice(d.last_cols, t), slice(0, Nt - 1))):
            if ks.stop <= ks.start or blocks.stop <= blocks.start:
                continue
            Pk = Pi[:, :, blocks].reshape(r, -1)
            Rk = Yi[:, ks, blocks].permute(1, 0, 2).reshape(ks.stop - ks.start, -1)
            dec[i * t + ks.start:i * t + ks.stop] = _solve(Pk @ Pk.T, (Rk @ Pk.T).T, ridge).T
    return dec


def fit_enc_x(d: TileData, dec: torch.Tensor, w_hat: torch.Tensor, ridge: float = 1e-8, chunk: int = 1024,
              method: str = "auto") -> torch.Tensor:
    """Least-squares E_x (r, n*t) given D and w_hat (unknowns (l, ij), r*n*t of them).

    With F[l, a, ij, b] = sum_c Xt[a, ij, c] w_hat[l, c, b] the normal equations are
    G[(l,ij), (l',ij')] = sum_{a,b} (D_ab^T D_ab)[l, l'] F[l,a,ij,b] F[l',a,ij',b] (D_ab: decoder rows
    of real entries of tile (a, b)) and H[(l,ij)] = sum_{a,b} (D^T Yt[a])[l, b] F[l, a, ij, b].
    ``method="data"`` forms F chunk by chunk (cost ~ A Nt (r n t)^2, the reference path);
    ``"gram"`` contracts the input Gram S[(ij,c),(ij',c')] = sum_a Xt Xt with
    (sum_b w_hat[l,c,b] w_hat[l',c',b]) instead (cost ~ A (n t Kt)^2 + r^2 (n t Kt)^2, independent
    of N); ``"auto"`` picks "gram" when its matrices fit in ~256 MB.
    """
    dec, w_hat = dec.double(), w_hat.double()
    r, nt = w_hat.shape[0], d.Xt.shape[1]
    Kt = d.Xt.shape[2]
    if method == "auto":
        method = "gram" if 8 * max(r * r * Kt * Kt, (nt * Kt) ** 2) < 256 * 2**20 else "data"
    if method not in ("gram", "data"):
        raise ValueError(f"method must be 'auto', 'gram' or 'data', got {method!r}")
    G = torch.zeros(r * nt, r * nt, dtype=torch.float64)
    Q = torch.einsum("el,aeb->lab", dec, d.Yt)  # (r, A, Nt)
    R = torch.bmm(Q, w_hat.transpose(1, 2))  # (r, A, Kt): sum_b Q[l,a,b] w_hat[l,c,b]
    H = torch.einsum("ajc,lac->lj", d.Xt, R).reshape(-1)

    def big(m):
        return m.repeat_interleave(nt, 0).repeat_interleave(nt, 1)

    for v, idx in _groups(d):
        if method == "gram":
            Xa = d.Xt[idx].reshape(len(idx), nt * Kt)
            S = (Xa.T @ Xa).reshape(nt, Kt, nt, Kt)
            for cols, kv in d.col_blocks():
                wc = w_hat[:, :, cols]
                WW = torch.einsum("lcb,LCb->lLcC", wc, wc)
                G += torch.einsum("lLcC,jcJC->ljLJ", WW, S).reshape(r * nt, r * nt) * big(_dtd(dec, d.n, d.t, v, kv))
            continue
        for s in range(0, len(idx), chunk):
            ids = idx[s:s + chunk]
            for cols, kv in d.col_blocks():
                Fm = torch.einsum("ajc,lcb->lajb", d.Xt[ids], w_hat[:, :, cols])  # (r, a, nt, nb)
                Ff = Fm.permute(0, 2, 1, 3).reshape(r * nt, -1)  # ((l,j), (a,b))
                G += (Ff @ Ff.T) * big(_dtd(dec, d.n, d.t, v, kv))
    return _solve(G, H[:, None], ridge)[:, 0].reshape(r, nt)


# ------------------------------------------------------------------ report
@dataclass
class LayerCalibration:
    name: str
    shape: str
    format: tuple
    rank: int
    rows: int
    rel_err_before: float
    sqnr_db_before: float
    rel_err_after: float
    sqnr_db_after: float
    history: list = field(default_factory=list)  # (step, rel_err) after each fit step
    rel_err_heldout_before: float | None = None
    rel_err_heldout_after: float | None = None
    equations: int = 0  # per output column block: real rows x tile outputs
    unknowns: int = 0  # per output column block: rank x ceil(K / tile) entries of w_hat

    @property
    def underdetermined(self) -> bool:
        return self.equations < self.unknowns


@dataclass
class CalibrationReport:
    layers: list[LayerCalibration]

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def table(self) -> str:
        head = (f"{'layer':<32} {'shape':<12} {'format':<9} {'r':>3} {'rows':>7} {'eqs/unknowns':>12} "
                f"{'rel.err before':>14} {'SQNR dB':>8} {'rel.err after':>13} {'SQNR dB':>8}")
        lines = [head, "-" * len(head)]
        for c in self.layers:
            fmt = "<{},{},{}>".format(*c.format)
            ratio = f"{c.equations / c.unknowns:.2f}" if c.unknowns else "-"
            lines.append(
                f"{c.name[:32]:<32} {c.shape:<12} {fmt:<9} {c.rank:>3} {c.rows:>7} {ratio:>12} {c.rel_err_before:>14.4f} "
                f"{c.sqnr_db_before:>8.2f} {c.rel_err_after:>13.4f} {c.sqnr_db_after:>8.2f}"
                + ("  UNDERDETERMINED" if c.underdetermined else "")
            )
        return "\n".join(lines)


# ------------------------------------------------------------------ driver
class _Stop(Exception):
    pass


def _as_call(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of the model call for one batch: dict -> model(**b), tuple -> model(*b), else model(b)."""
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):  # incl. BatchEncoding
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _record(model, names: list[str], batches, stop_after: str | None = None, masks: dict | None = None
            ) -> dict[str, list[torch.Tensor]]:
    """Run ``model`` on ``batches`` and return the first positional input each named module received.

    Each call runs under the batch's ``attention_mask`` as row mask (:mod:`strassenkit.nn.padding`), as the
    converted model's own hook does; ``masks`` (if given) receives, per module, the (B, L) real-row mask
    that matched each recorded input, or None.
    """
    mods = dict(model.named_modules())
    rec: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def make(name):
        def hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            rec[name].append(x.detach().to("cpu", torch.float64))
            if masks is not None:
                rm = current_row_mask()
                masks.setdefault(name, []).append(rm.mask.cpu() if rm is not None and rm.matches(x) else None)
            if stop_after == name:
                raise _Stop

        return hook

    for n in names:
        if n not in mods:
            raise KeyError(f"module {n!r} not found in the model used for recording")
        handles.append(mods[n].register_forward_pre_hook(make(n)))
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                args, kwargs = _as_call(b)
                try:
                    with row_mask(attention_mask_of(model, args, kwargs)):
                        model(*args, **kwargs)
                except _Stop:
                    pass
                except Exception as e:
                    raise _batch_error(e, i, b) from e
    finally:
        for h in handles:
            h.remove()
    return rec


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return "a dict {" + ", ".join(f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                                       for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"


def _batch_error(e: Exception, i: int, batch) -> Exception:
    """``e`` with the batch that caused it named (same type when it can be rebuilt from a message)."""
    msg = (f"calibrate_: the model failed on batch {i} ({_describe(batch)}): {e}. Batches must be model inputs: "
           f"tensor -> model(t), tuple -> model(*t), dict -> model(**t)")
    try:
        return type(e)(msg)
    except Exception:  # noqa: BLE001 - exception types whose constructor takes other arguments
        return RuntimeError(msg)


def _check_inputs(name: str, layer: STLinear, xs: list[torch.Tensor], what: str) -> None:
    """Recorded inputs of ``layer`` must have its feature size, be finite and not all zero (clear errors)."""
    for i, x in enumerate(xs):
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"calibrate_: layer {name!r} expects inputs with {layer.in_features} features but got shape "
                             f"{tuple(x.shape)} from {what} {i}; pass batches the model accepts (the model's inputs, "
                             f"not this layer's)")
        if not torch.isfinite(x).all():
            raise ValueError(f"calibrate_: layer {name!r} received NaN or infinite inputs from {what} {i} (shape "
                             f"{tuple(x.shape)}); clean the batches (or the earlier layers that produce them)")
    if all(not bool(x.any()) for x in xs):
        raise ValueError(f"calibrate_: layer {name!r} received only zero inputs from all {what}es, so there is nothing to fit "
                         f"(the least-squares fit would set w_hat to 0); pass batches of real data")


def _dense_weight(name: str, layer: STLinear, reference: nn.Module | None) -> torch.Tensor:
    if reference is not None:
        ref = dict(reference.named_modules()).get(name)
        if ref is None:
            raise KeyError(f"calibrate_: reference model has no module {name!r}; it must be the dense model the "
                           f"converted one was made from (same module names)")
        w = getattr(ref, "weight", None)
        if w is None or tuple(w.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"calibrate_: reference {name!r} must be an nn.Linear({layer.in_features}, "
                             f"{layer.out_features}), got {ref!r}")
        return w.detach().to("cpu", torch.float64)
    w = getattr(layer, "dense_weight", None)
    if w is None:
        raise ValueError(
            f"calibrate_: {name} has no dense_weight buffer and no reference model was given. Pass reference=<the "
            f"dense model before conversion>, or convert with strassenify_(..., STLConfig(keep_dense_weight=True))"
        )
    return w.detach().to("cpu", torch.float64)


def _as_list(batches, what):
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError(f"{what} is empty: pass a few batches of model inputs")
    return out


def calibrate_(
    model: nn.Module,
    batches,
    reference: nn.Module | None = None,
    alternate: int = 0,
    sequential: bool = True,
    layers: list[str] | None = None,
    fit_enc: bool = True,
    ridge: float = 1e-6,
    heldout=None,
    progress: bool = True,
) -> CalibrationReport:
    """Fit the STLinear layers of ``model`` to real activations, in place; returns a report.

    Args:
        model: a model converted by :func:`strassenify_` (or any model holding STLinear layers).
        batches: a few batches of model inputs (tensor -> model(t), tuple -> model(*t), dict -> model(**t)).
        reference: the dense model before conversion; its nn.Linear weights (matched by module name)
            define the targets. Without it each layer uses its ``dense_weight`` buffer.
        alternate: extra rounds of (D-step, E_x-step, w_hat-step) after the first w_hat fit
            (``fit_enc=False`` keeps E_x fixed and alternates D and w_hat only).
        sequential: fit layers one by one in module order, each on the inputs it sees in the
            converted model after the earlier layers were calibrated (default). ``False`` records all
            layers in one pass (from ``reference`` if given, else from the converted model).
        layers: restrict to these STLinear module names.
        ridge: Tikhonov term relative to the mean diagonal of each normal-equation matrix.
        heldout: optional batches (not used for fitting) on which the error is also reported.

    The objective per layer is ||X W^T - STL(X, w_hat)||_F over the real rows of the recorded inputs
    X. Reported per layer: relative error ||.||/||X W^T|| and SQNR = 20 log10(1/rel.err) dB, before
    and after.
    """
    check_int("alternate", alternate, lo=0)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0 (relative Tikhonov term, default 1e-6), got {ridge!r}")
    if isinstance(layers, str):
        layers = [layers]
    batches = _as_list(batches, "batches")
    heldout = _as_list(heldout, "heldout")
    stl = [(n, m) for n, m in model.named_modules() if isinstance(m, STLinear)]
    if layers is not None:
        missing = sorted(set(layers) - {n for n, _ in stl})
        if missing:
            raise KeyError(f"calibrate_: layers {missing} are not STLinear modules of the model")
        stl = [(n, m) for n, m in stl if n in layers]
    if not stl:
        warnings.warn("calibrate_: the model has no STLinear layer to calibrate", stacklevel=2)
        return CalibrationReport([])
    weights = {n: _dense_weight(n, m, reference) for n, m in stl}
    was_training = model.training
    model.eval()
    if reference is not None:
        reference.eval()
    pre = None
    if not sequential:
        src = reference if reference is not None else model
        pre_masks: dict = {}
        pre = _record(src, [n for n, _ in stl], batches, masks=pre_masks)
    results = []
    bar = tqdm(stl, desc="calibrate", disable=not progress, leave=False)
    try:
        for name, layer in bar:
            if pre is not None:
                xs, ms = pre[name], pre_masks.get(name)
            else:
                rec_masks: dict = {}
                xs = _record(model, [name], batches, stop_after=name, masks=rec_masks)[name]
                ms = rec_masks.get(name)
            _check_inputs(name, layer, xs, "batch")
            W = weights[name]
            ys = [x @ W.T for x in xs]
            d = TileData.from_activations(xs, ys, layer.row_tile, layer.tile, ms)
            equations, unknowns = int(d.valid.sum()) * layer.tile, layer.rank * d.Xt.shape[2]
            if equations < unknowns:
                warnings.warn(
                    f"calibrate_: {name} is underdetermined: {int(d.valid.sum())} real rows give {equations} equations "
                    f"per output column block for {unknowns} unknowns of w_hat, so the fit can match these batches "
                    f"exactly and generalise badly. Pass more batches (>= {math.ceil(unknowns / layer.tile)} real "
                    f"rows), a larger ridge= (now {ridge:g}; e.g. {max(1e-2, 10 * ridge):g}), and heldout= batches to see "
                    f"the error on unseen data",
                    stacklevel=2)
            enc_x, dec, w_hat = (p.detach().cpu().double() for p in (layer.enc_x, layer.dec, layer.w_hat))
            rel0, sq0 = tile_error(d, enc_x, w_hat, dec)
            hist = []
            w_hat = fit_w_hat(d, enc_x, dec, ridge)
            hist.append(("w_hat", tile_error(d, enc_x, w_hat, dec)[0]))
            for _ in range(alternate):
                dec = fit_dec(d, enc_x, w_hat, ridge)
                hist.append(("dec", tile_error(d, enc_x, w_hat, dec)[0]))
                if fit_enc:
                    enc_x = fit_enc_x(d, dec, w_hat, ridge)
                    hist.append(("enc_x", tile_error(d, enc_x, w_hat, dec)[0]))
                w_hat = fit_w_hat(d, enc_x, dec, ridge)
                hist.append(("w_hat", tile_error(d, enc_x, w_hat, dec)[0]))
            rel1, sq1 = tile_error(d, enc_x, w_hat, dec)
            hb = ha = None
            if heldout is not None:
                h_masks: dict = {}
                hx = _record(model, [name], heldout, stop_after=name, masks=h_masks)[name]
                _check_inputs(name, layer, hx, "heldout batch")
                dh = TileData.from_activations(hx, [x @ W.T for x in hx], layer.row_tile, layer.tile, h_masks.get(name))
                hb = tile_error(dh, layer.enc_x.detach().cpu(), layer.w_hat.detach().cpu(), layer.dec.detach().cpu())[0]
                ha = tile_error(dh, enc_x, w_hat, dec)[0]
            with torch.no_grad():
                layer.w_hat.copy_(w_hat.to(layer.w_hat))
                layer.dec.copy_(dec.to(layer.dec))
                layer.enc_x.copy_(enc_x.to(layer.enc_x))
            results.append(LayerCalibration(
                name, f"{layer.in_features}->{layer.out_features}", layer.format, layer.rank,
                int((d.valid).sum()), rel0, sq0, rel1, sq1, hist, hb, ha, equations, unknowns,
            ))
            bar.set_postfix(layer=name, err=f"{rel0:.3f}->{rel1:.3f}")
    finally:
        model.train(was_training)
    return CalibrationReport(results)
