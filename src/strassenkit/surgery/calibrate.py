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
           "fit_dec", "fit_enc_x", "tile_error", "TileStats", "fit_w_hat_stats", "fit_dec_stats", "fit_enc_x_stats",
           "stats_error"]


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
                         masks: list[torch.Tensor | None] | None = None,
                         dtype: torch.dtype = torch.float64) -> "TileData":
        """xs: inputs (..., L, K); ys: targets (..., L, N) (2-D inputs are one row per sample).

        masks: optional (B, L) real-row masks per input (right padding for n > 1): padding rows are
        zeroed (as the layer's forward does) and excluded from the fit; tiles without real rows are dropped.
        dtype: of Xt and Yt (float64 by default; :class:`TileStats` streams float32 batches through here).
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
            x = x.reshape(-1, L, K).to(dtype)
            y = y.reshape(x.shape[0], L, N).to(dtype)
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


def _solve(G: torch.Tensor, H: torch.Tensor, ridge: float, inplace: bool = False) -> torch.Tensor:
    """(G + ridge * mean(diag G) I)^-1 H by Cholesky; a float32 system that is not numerically positive
    definite is retried in float64, a singular one gets the minimum-norm least-squares solution.
    ``inplace`` lets the ridge be added to G itself (saves a copy of a large G)."""
    dim = G.shape[0]
    lam = ridge * float(torch.diagonal(G).mean()) if dim else 0.0
    A = G if inplace else G.clone()
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(H, L)
    del L
    if A.dtype == torch.float32:
        return _solve(A.double(), H.double(), 0.0, inplace=True).to(H.dtype)
    return torch.linalg.lstsq(A, H, driver="gelsd").solution  # singular: minimum-norm least squares


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


# ------------------------------------------------------------------ streamed sufficient statistics (fast path)
_SYRK_BLOCK = 1024


def _syrk_(S: torch.Tensor, X: torch.Tensor) -> bool:
    """S += X^T X; for large S only the upper block triangle is updated (about half the work of a full
    product; returns True: the lower triangle is then stale until :class:`_Grams` mirrors it)."""
    d = X.shape[1]
    if d <= 2 * _SYRK_BLOCK:
        S.addmm_(X.T, X)
        return False
    for i in range(0, d, _SYRK_BLOCK):
        Xi = X[:, i:i + _SYRK_BLOCK]
        S[i:i + _SYRK_BLOCK, i:].addmm_(Xi.T, X[:, i:])
    return True


class _Grams(dict):
    """{v: S_v} whose lower triangles are mirrored from the upper ones on first read after an update."""

    def __init__(self, *a):
        super().__init__(*a)
        self.stale: set = set()

    def __getitem__(self, v):
        S = dict.__getitem__(self, v)
        if v in self.stale:
            d = S.shape[0]
            for i in range(0, d, _SYRK_BLOCK):
                S[i + _SYRK_BLOCK:, i:i + _SYRK_BLOCK] = S[i:i + _SYRK_BLOCK, i + _SYRK_BLOCK:].T
            self.stale.discard(v)
        return S

    def items(self):
        return [(v, self[v]) for v in self.keys()]

    def values(self):
        return [self[v] for v in self.keys()]


@dataclass
class TileStats:
    """Sufficient statistics of one layer's calibration data in tile layout, accumulated batch by batch.

    Every least-squares step above needs the data only through three sums, so activations never have to be
    held (``TileData`` keeps them all):

        S[v][(j,c), (j',c')] = sum over tiles a with v real rows of Xt[a,j,c] Xt[a,j',c']   (j, j' < v*t)
        C[(j,c), (e,b)]      = sum over all tiles of Xt[a,j,c] Yt[a,e,b]
        yy                   = ||Y||^2 over real entries

    (indices flattened row-major: (j,c) -> j*Kt + c, (e,b) -> e*Nt + b; rows j >= v*t of a tile with v real
    rows are zero, so S[v] keeps only the first v*t*Kt indices). ``S`` depends only on the inputs, not on the
    target, the codec (E_x, D) or the rank: layers that see the same input (query, key, value) share it, and
    every alternating step or candidate rank reuses it. ``add`` streams one batch in; ``dtype`` float32 (the
    default of :func:`calibrate_`) halves memory and time, float64 reproduces :class:`TileData` to rounding.
    """

    n: int
    t: int
    Kt: int
    Nt: int
    last_cols: int
    S: dict = field(default_factory=dict)
    C: torch.Tensor | None = None
    yy: float | torch.Tensor = 0.0  # a 0-dim float64 tensor on ``device`` once data was added (no host sync)
    tiles: dict = field(default_factory=dict)  # v -> number of tiles with v real rows
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # of S and C (the layer's device)

    @classmethod
    def empty(cls, in_features: int, out_features: int, n: int, t: int, dtype=torch.float64,
              share_inputs: "TileStats | None" = None, device=None) -> "TileStats":
        """Empty statistics for an (in_features -> out_features) layer with <n,t,t> tiles.

        ``share_inputs``: another layer's statistics over the same inputs; its ``S`` (and tile counts) are
        shared, and :meth:`add` of this one then accumulates only ``C`` and ``yy`` (pass ``inputs_shared=True``).
        ``device``: where the sums live (default CPU; :func:`calibrate_` uses the layer's device), batches
        added must be on it.
        """
        Kt, Nt = math.ceil(in_features / t), math.ceil(out_features / t)
        device = torch.device(device) if device is not None else torch.device("cpu")
        st = cls(n, t, Kt, Nt, out_features - (Nt - 1) * t, S=_Grams(), dtype=dtype, device=device)
        st.C = torch.zeros(n * t * Kt, n * t * Nt, dtype=dtype, device=device)
        if share_inputs is not None:
            if (share_inputs.n, share_inputs.t, share_inputs.Kt) != (n, t, Kt):
                raise ValueError("share_inputs must have the same tile format and input size")
            st.S, st.tiles = share_inputs.S, share_inputs.tiles
        return st

    @property
    def rows(self) -> int:
        """Real rows seen (sum over tiles of their real rows)."""
        return sum(v * a for v, a in self.tiles.items())

    def add_tiles(self, d: "TileData", inputs_shared: bool = False) -> None:
        """Accumulate a :class:`TileData` (one batch) into the sums."""
        A = d.Xt.shape[0]
        if A == 0:
            return
        nt, Kt, Nt = self.n * self.t, self.Kt, self.Nt
        X = d.Xt.to(self.dtype).reshape(A, nt * Kt)
        if d.Yt is not None:
            Y = d.Yt.to(self.dtype).reshape(A, nt * Nt)
            self.C.addmm_(X.T, Y)
            self.yy = self.yy + d.Yt.double().pow(2).sum()
        if inputs_shared:
            return
        if not isinstance(self.S, _Grams):
            self.S = _Grams(self.S)
        for v, idx in _groups(d):
            Xv = X[idx, : v * self.t * Kt] if len(idx) < A else X[:, : v * self.t * Kt]
            if v not in self.S:
                dict.__setitem__(self.S, v, torch.zeros(Xv.shape[1], Xv.shape[1], dtype=self.dtype, device=Xv.device))
            if _syrk_(dict.__getitem__(self.S, v), Xv):
                self.S.stale.add(v)
            self.tiles[v] = self.tiles.get(v, 0) + len(idx)

    def add(self, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None = None,
            inputs_shared: bool = False):
        """Accumulate one batch: inputs x (..., L, K), targets y (..., L, N), optional (B, L) real-row mask.

        ``y=None`` accumulates the inputs only (S); :meth:`set_dense_target` then derives C and yy for
        Y = X W^T from S, which is far cheaper than streaming them.
        """
        if y is None:
            y = x.new_zeros(x.shape[:-1] + (0,))
            self.C = None
        d = TileData.from_activations([x], [y], self.n, self.t, [mask], dtype=self.dtype)
        if d.Yt.shape[2] == 0:
            d.Yt = None
        self.add_tiles(d, inputs_shared)

    def set_dense_target(self, weight: torch.Tensor) -> "TileStats":
        """C and yy of the target Y = X W^T (weight (N, K)) from S alone.

        C[(j,c), ((i,k),b)] = sum_{k',c'} S[(j,c), ((i,k'),c')] W[b t + k, c' t + k'] and
        yy = sum_i tr(Wm^T S_ii Wm) with S_ii the block of tile row i and Wm[(k',c'), (k,b)] = W[b t + k, c' t + k'].
        """
        n, t, Kt, Nt = self.n, self.t, self.Kt, self.Nt
        N, K = weight.shape
        if math.ceil(K / t) != Kt or math.ceil(N / t) != Nt:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit statistics with Kt={Kt}, Nt={Nt}")
        Wp = F.pad(weight.to(self.device, self.dtype), (0, Kt * t - K, 0, Nt * t - N))  # (Nt t, Kt t)
        W4 = Wp.reshape(Nt, t, Kt, t).permute(2, 3, 0, 1)  # [c', k', b, k]
        C = torch.zeros(n * t, Kt, n, t, Nt, dtype=self.dtype, device=self.device)
        Wm = W4.permute(1, 0, 3, 2).reshape(t * Kt, t * Nt)  # [(k',c'), (k,b)]
        ssum = torch.zeros(t * Kt, t * Kt, dtype=self.dtype, device=self.device)
        for v, S in self.S.items():
            vt = v * t
            S5 = S.view(vt, Kt, v, t, Kt)  # [j, c, i, k', c']
            C[:vt, :, :v] += torch.einsum("jcimC,Cmbk->jcikb", S5, W4)
            S6 = S.view(v, t, Kt, v, t, Kt)
            for i in range(v):
                ssum += S6[i, :, :, i].reshape(t * Kt, t * Kt)
        self.C = C.reshape(n * t * Kt, n * t * Nt)
        self.yy = (Wm.double() * (ssum @ Wm).double()).sum()
        return self

    @classmethod
    def from_tiledata(cls, d: "TileData", dtype=torch.float64) -> "TileStats":
        st = cls.empty(d.Xt.shape[2] * d.t, (d.Yt.shape[2] - 1) * d.t + d.last_cols, d.n, d.t, dtype)
        st.add_tiles(d)
        return st

    def copy_for_target(self) -> "TileStats":
        """Empty target sums (C, yy) over the same inputs (S shared): for another layer reading this input."""
        st = TileStats(self.n, self.t, self.Kt, self.Nt, self.last_cols, self.S, torch.zeros_like(self.C), 0.0,
                       self.tiles, self.dtype, self.device)
        return st


def _ddtd(dec, n, t, v, kv, dtype):
    return _dtd(dec.to(dtype), n, t, v, kv)


def _stats_col_groups(st: TileStats):
    """[(column-block slice, real columns per tile)] as TileData.col_blocks."""
    if st.last_cols == st.t:
        return [(slice(0, st.Nt), st.t)]
    out = [(slice(0, st.Nt - 1), st.t)] if st.Nt > 1 else []
    return out + [(slice(st.Nt - 1, st.Nt), st.last_cols)]


def _m_v(st: TileStats, v: int, enc_x: torch.Tensor) -> torch.Tensor:
    """M_v[(l,c), (l',c')] = sum over tiles with v real rows of x_hat[l,a,c] x_hat[l',a,c'], shape (r*Kt, r*Kt)."""
    r, Kt, vt = enc_x.shape[0], st.Kt, v * st.t
    Ev = enc_x[:, :vt].to(st.dtype)
    T = (Ev @ st.S[v].view(vt, Kt * vt * Kt)).view(r * Kt, vt, Kt)  # [(l,c), J, C]
    return torch.matmul(Ev, T).view(r * Kt, r * Kt)  # [(l,c), L, C] -> [(l,c), (L,C)]


def _cross(st: TileStats, enc_x: torch.Tensor) -> torch.Tensor:
    """T2[l, c, e, b] = sum_j E_x[l, j] C[(j,c), (e,b)], shape (r, Kt, n*t, Nt)."""
    r, nt = enc_x.shape[0], st.n * st.t
    return (enc_x.to(st.dtype) @ st.C.view(nt, st.Kt * nt * st.Nt)).view(r, st.Kt, nt, st.Nt)


def _w_normal(st: TileStats, enc_x, dec):
    """Normal equations of the w_hat step: ([(G, column slice)] per column group, H (r*Kt, Nt)).

    G[(l,c),(l',c')] = sum_v DtD_v[l,l'] sum_{j,j'} E[l,j] E[l',j'] S_v[(j,c),(j',c')], built row block by
    row block: G[l] = sum_v (DtD_v[l,:,None] * E_v) @ (E_v[l] S_v), so no (r*Kt)^2 temporary is formed.
    """
    r, Kt, t = enc_x.shape[0], st.Kt, st.t
    E = enc_x.to(st.dtype)
    groups = _stats_col_groups(st)
    Gs = [torch.zeros(r * Kt, r * Kt, dtype=st.dtype, device=E.device) for _ in groups]
    views = [G.view(r, Kt, r, Kt) for G in Gs]
    chunk = max(1, min(r, 8))
    for v in sorted(st.S):
        vt = v * t
        Ev = E[:, :vt]
        Sv = st.S[v].view(vt, Kt * vt * Kt)
        dtds = [_ddtd(dec, st.n, t, v, kv, st.dtype) for _, kv in groups]
        for l0 in range(0, r, chunk):
            ls = range(l0, min(r, l0 + chunk))
            T = (Ev[l0:ls.stop] @ Sv).view(len(ls), Kt, vt, Kt)  # T[l, c, J, C] = sum_j E[l,j] S[(j,c),(J,C)]
            for k, l in enumerate(ls):
                for Gv, dtd in zip(views, dtds):
                    El = dtd[l][:, None] * Ev  # (r, vt): DtD_v[l, L] E[L, J]
                    Gv[l] += torch.matmul(El, T[k])  # (Kt, r, Kt): [c, L, C]
    H = torch.einsum("el,lceb->lcb", dec.to(st.dtype), _cross(st, enc_x)).reshape(r * Kt, st.Nt)
    return [(G, cols) for G, (cols, _) in zip(Gs, groups)], H


def _solve_dtype(G, H, ridge, dtype, keep=False):
    """Solve with ridge; ``keep`` restores G's diagonal afterwards (G stays usable, e.g. for errors)."""
    if dtype is not None and dtype != G.dtype:
        return _solve(G.to(dtype), H.to(dtype), ridge, inplace=True)
    if not keep:
        return _solve(G, H, ridge, inplace=True)
    diag = G.diagonal().clone()
    try:
        return _solve(G, H, ridge, inplace=True)
    finally:
        G.diagonal().copy_(diag)


def _normal_error(st: TileStats, Gs, H, w_hat) -> tuple[float, float]:
    """(relative error, SQNR dB) of w_hat from the normal equations it was fitted with."""
    w = w_hat.to(st.dtype).reshape(-1, st.Nt)
    quad = sum(float((w[:, cols].double() * (G @ w[:, cols]).double()).sum()) for G, cols in Gs)
    den = float(st.yy)
    num = max(den - 2 * float((w.double() * H.double()).sum()) + quad, 0.0)
    rel = math.sqrt(num / den) if den > 0 else float("nan")
    sqnr = 10 * math.log10(den / num) if num > 0 else float("inf")
    return rel, sqnr


def fit_w_hat_stats(st: TileStats, enc_x: torch.Tensor, dec: torch.Tensor, ridge: float = 1e-8,
                    solve_dtype: torch.dtype | None = None, w_old: torch.Tensor | None = None,
                    errors: list | None = None) -> torch.Tensor:
    """:func:`fit_w_hat` from streamed statistics: one Cholesky solve per column group (all Nt right-hand sides).

    With ``errors`` (a list), the relative error of ``w_old`` (if given) and of the result are appended,
    computed from the same normal equations (no second pass).
    """
    r, Kt = enc_x.shape[0], st.Kt
    Gs, H = _w_normal(st, enc_x, dec)
    if errors is not None and w_old is not None:
        errors.append(_normal_error(st, Gs, H, w_old))
    out = torch.empty(r * Kt, st.Nt, dtype=st.dtype, device=H.device)
    for G, cols in Gs:
        out[:, cols] = _solve_dtype(G, H[:, cols], ridge, solve_dtype, keep=errors is not None).to(st.dtype)
    out = out.reshape(r, Kt, st.Nt)
    if errors is not None:
        errors.append(_normal_error(st, Gs, H, out))
    return out


def stats_error(st: TileStats, enc_x, w_hat, dec) -> tuple[float, float]:
    """(relative error, SQNR dB) from the statistics: ||Y - Yhat||^2 = yy - 2 <w, H> + sum_b w_b^T G w_b.

    Float32 statistics give the error to about 1e-3 relative (cancellation); use float64 for smaller errors.
    """
    Gs, H = _w_normal(st, enc_x, dec)
    return _normal_error(st, Gs, H, w_hat)


def fit_dec_stats(st: TileStats, enc_x: torch.Tensor, w_hat: torch.Tensor, ridge: float = 1e-8,
                  solve_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`fit_dec` from statistics: per output row i of the tile, an r x r solve from M_v and w_hat w_hat^T."""
    r, Kt, Nt, t, n = enc_x.shape[0], st.Kt, st.Nt, st.t, st.n
    w = w_hat.to(st.dtype)
    # column groups: k < last_cols uses every column block, k >= last_cols all but the last
    kgroups = [(slice(0, st.last_cols), slice(0, Nt)), (slice(st.last_cols, t), slice(0, Nt - 1))]
    kgroups = [(ks, bs) for ks, bs in kgroups if ks.stop > ks.start and bs.stop > bs.start]
    WW = []
    for _, bs in kgroups:
        wf = w[:, :, bs].reshape(r * Kt, -1)
        WW.append((wf @ wf.T).view(r, Kt, r, Kt))
    # GD[g][v][l, l'] = sum_{c,c'} M_v[l,c,l',c'] WW_g[l,c,l',c']
    GD = [{} for _ in kgroups]
    for v in sorted(st.S):
        M = _m_v(st, v, enc_x).view(r, Kt, r, Kt)
        for g, W2 in enumerate(WW):
            GD[g][v] = torch.stack([(M[l] * W2[l]).sum((0, 2)) for l in range(r)])
        del M
    T2 = _cross(st, enc_x)  # (r, Kt, e, Nt)
    dec_out = torch.zeros(n * t, r, dtype=st.dtype, device=T2.device)
    for g, (ks, bs) in enumerate(kgroups):
        HD = torch.einsum("lceb,lcb->el", T2[..., bs], w[:, :, bs])  # (n*t, r)
        for i in range(n):
            vs = [v for v in GD[g] if v > i]
            if not vs:
                continue
            G = sum(GD[g][v] for v in vs)
            rows = slice(i * t + ks.start, i * t + ks.stop)
            dec_out[rows] = _solve_dtype(G, HD[rows].T, ridge, solve_dtype).T.to(st.dtype)
    return dec_out


def fit_enc_x_stats(st: TileStats, dec: torch.Tensor, w_hat: torch.Tensor, ridge: float = 1e-8,
                    solve_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`fit_enc_x` ("gram" method) from statistics."""
    r, Kt, nt = w_hat.shape[0], st.Kt, st.n * st.t
    w = w_hat.to(st.dtype)
    G = torch.zeros(r, nt, r, nt, dtype=st.dtype, device=w.device)
    for cols, kv in _stats_col_groups(st):
        wc = w[:, :, cols].reshape(r * Kt, -1)
        WW = (wc @ wc.T).view(r, Kt, r, Kt)
        for v in sorted(st.S):
            vt = v * st.t
            Sv = st.S[v].view(vt, Kt, vt, Kt)
            blk = torch.einsum("lcLC,jcJC->ljLJ", WW, Sv)  # (r, vt, r, vt)
            G[:, :vt, :, :vt] += blk * _ddtd(dec, st.n, st.t, v, kv, st.dtype)[:, None, :, None]
    U = torch.einsum("el,jceb->ljcb", dec.to(st.dtype), st.C.view(nt, Kt, nt, st.Nt))  # (r, nt, Kt, Nt)
    H = torch.einsum("ljcb,lcb->lj", U, w).reshape(-1)
    return _solve_dtype(G.reshape(r * nt, r * nt), H[:, None], ridge, solve_dtype)[:, 0].reshape(r, nt).to(st.dtype)


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
    ridge: float | None = None  # the ridge used (the held-out choice when calibrate_ got several)
    enc_rank: int | None = None  # numerical rank of the layer's E_x before the fit (full: min(rank, n*m))
    dec_rank: int | None = None  # numerical rank of its D before the fit (full: min(rank, n*p))

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
        return w.detach().to(layer.w_hat.device, torch.float64)
    w = getattr(layer, "dense_weight", None)
    if w is None:
        raise ValueError(
            f"calibrate_: {name} has no dense_weight buffer and no reference model was given. Pass reference=<the "
            f"dense model before conversion>, or convert with strassenify_(..., STLConfig(keep_dense_weight=True))"
        )
    return w.detach().to(layer.w_hat.device, torch.float64)


def _as_list(batches, what):
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError(f"{what} is empty: pass a few batches of model inputs")
    return out


# ------------------------------------------------------------------ streamed driver
def _same_input(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def _execution_groups(model, stl: list[tuple[str, STLinear]], batch) -> list[list[tuple[str, STLinear]]]:
    """The layers in the order one forward pass calls them; consecutive layers that receive the very same
    input tensor with the same tile format (query, key, value) form one group (they share S). Layers the
    pass never calls follow in module order."""
    mods = {id(m): (n, m) for n, m in stl}
    order: list[tuple[str, torch.Tensor]] = []
    handles = []

    def hook(module, args, kwargs=None):
        if args and isinstance(args[0], torch.Tensor):
            order.append((mods[id(module)][0], args[0]))

    for _, m in stl:
        handles.append(m.register_forward_pre_hook(hook))
    try:
        args, kwargs = _as_call(batch)
        with torch.no_grad(), row_mask(attention_mask_of(model, args, kwargs)):
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the streaming pass reports bad batches with the layer's name
        return [[(n, m)] for n, m in stl]
    finally:
        for h in handles:
            h.remove()
    by_name = dict(stl)
    groups: list[list[tuple[str, STLinear]]] = []
    seen: set[str] = set()
    prev = None
    for name, x in order:
        if name in seen:  # called twice (shared module): its first call decides
            continue
        seen.add(name)
        layer = by_name[name]
        if (prev is not None and groups and _same_input(prev[1], x)
                and getattr(by_name[prev[0]], "format", None) == getattr(layer, "format", None)
                and getattr(by_name[prev[0]], "in_features", None) == getattr(layer, "in_features", None)):
            groups[-1].append((name, layer))
        else:
            groups.append([(name, layer)])
        prev = (name, x)
    groups += [[(n, m)] for n, m in stl if n not in seen]
    return groups


class _GroupMismatch(Exception):
    pass


class _Calls:
    """Zero-argument forward calls, one per batch (``batches``: the batch objects, for error messages).

    ``of_model``: the whole model on each batch, under the batch's attention mask as row mask. A
    :class:`_BlockCache` gives calls of one block on cached inputs instead (``ref_calls``: the same for
    the reference model).
    """

    def __init__(self, calls, batches, ref_calls=None):
        self.calls, self.batches, self.ref_calls = calls, batches, ref_calls

    @classmethod
    def of_model(cls, model, batches, mask: bool = True) -> "_Calls":
        def make(b):
            args, kwargs = _as_call(b)

            def call():
                with row_mask(attention_mask_of(model, args, kwargs) if mask else None):
                    model(*args, **kwargs)

            return call

        return cls([make(b) for b in batches], list(batches))


def _find_blocks(model: nn.Module, names: list[str]):
    """(name, ModuleList) of the repeated blocks that hold every layer in ``names``, or None."""
    best = None
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and n:
            if all(x.startswith(n + ".") for x in names):
                if best is None or len(n) > len(best[0]):
                    best = (n, m)
    return best


def _capture_block_inputs(model, block, batches, mask=True):
    """The (args, kwargs) each batch gives ``block`` in a forward pass of ``model`` (cut right there)."""
    got = []

    def hook(module, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                args, kwargs = _as_call(b)
                got.clear()
                try:
                    with row_mask(attention_mask_of(model, args, kwargs) if mask else None):
                        model(*args, **kwargs)
                except _Stop:
                    pass
                except Exception as e:
                    raise _batch_error(e, i, b) from e
                if not got:
                    return None
                a, k = got[0]
                rm = attention_mask_of(model, args, kwargs) if mask else None
                out.append([a, k, rm])
    finally:
        h.remove()
    return out


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    try:
        return bool(a == b) or a is b
    except Exception:  # noqa: BLE001
        return False


class _BlockCache:
    """Inputs of one block of repeated blocks (``model.<name>[i]``) for every batch, advanced block by block.

    Calibrating the layers of block i then runs only block i on its cached inputs instead of the whole
    model up to it (the usual GPTQ-style trick). ``advance`` runs block i on every cached input and takes
    its first output as the next block's input (keyword arguments are reused); it checks that on the first
    batch against a real forward pass of the model and returns False if they differ (then the caller falls
    back to whole-model passes).
    """

    def __init__(self, model, blocks, batches, reference=None, ref_blocks=None):
        self.model, self.blocks, self.batches = model, blocks, list(batches)
        self.reference, self.ref_blocks = reference, ref_blocks
        self.index = 0
        self.inputs = _capture_block_inputs(model, blocks[0], self.batches)
        self.ref_inputs = (_capture_block_inputs(reference, ref_blocks[0], self.batches, mask=False)
                           if reference is not None else None)
        self.ok = self.inputs is not None and (reference is None or self.ref_inputs is not None)

    def calls(self) -> _Calls:
        def make(block, a, k, m):
            def call():
                with row_mask(m):
                    block(*a, **k)

            return call

        blk = self.blocks[self.index]
        calls = [make(blk, a, k, m) for a, k, m in self.inputs]
        ref = None
        if self.ref_inputs is not None:
            rblk = self.ref_blocks[self.index]
            ref = _Calls([make(rblk, a, k, None) for a, k, _ in self.ref_inputs], self.batches)
        return _Calls(calls, self.batches, ref)

    @staticmethod
    def _advance(block, inputs, mask=True):
        with torch.no_grad():
            for item in inputs:
                a, k, m = item
                with row_mask(m if mask else None):
                    out = block(*a, **k)
                h = out[0] if isinstance(out, (tuple, list)) else out
                if a:
                    item[0] = (h,) + tuple(a[1:])
                else:
                    key = next(iter(k))
                    item[1] = {**k, key: h}

    def advance(self) -> bool:
        i = self.index
        if i + 1 >= len(self.blocks):
            self.index += 1
            return True
        self._advance(self.blocks[i], self.inputs)
        if self.ref_inputs is not None:
            self._advance(self.ref_blocks[i], self.ref_inputs, mask=False)
        self.index += 1
        real = _capture_block_inputs(self.model, self.blocks[i + 1], self.batches[:1])
        a, k, _ = self.inputs[0]
        if real is None or not (_same_value(real[0][0], a) and _same_value(real[0][1], k)):
            return False
        if self.ref_inputs is not None:
            rreal = _capture_block_inputs(self.reference, self.ref_blocks[i + 1], self.batches[:1], mask=False)
            ra, rk, _ = self.ref_inputs[0]
            if rreal is None or not (_same_value(rreal[0][0], ra) and _same_value(rreal[0][1], rk)):
                return False
        return True


def _stream_stats(model, groups, batches, weights, dtype, what, reference=None, target="dense",
                  stop=True) -> dict[str, TileStats]:
    """One pass over ``batches``: the statistics of every layer of ``groups`` (each group shares one S).

    target "dense": Y = X W^T on the inputs X each layer receives in ``model``; "reference": Y is the output
    (minus bias) of the same-named module of ``reference`` on the same batch (the dense model's own
    activations), so errors of earlier converted layers are corrected instead of inherited. With ``stop``
    the forward pass is cut after the last layer of the last group (execution order).
    """
    layers = {n: m for g in groups for n, m in g}
    names = [n for g in groups for n, _ in g]
    lead_of = {n: g[0][0] for g in groups for n, _ in g}
    stats: dict[str, TileStats] = {}
    for g in groups:
        lead = g[0][0]
        L = layers[lead]
        stats[lead] = TileStats.empty(L.in_features, L.out_features, L.row_tile, L.tile, dtype, device=L.w_hat.device)
        for n, m in g[1:]:
            stats[n] = TileStats.empty(m.in_features, m.out_features, m.row_tile, m.tile, dtype,
                                       share_inputs=stats[lead], device=m.w_hat.device)
    Wd = {n: weights[n].to(dtype) for n in names}
    ref_out: dict[str, torch.Tensor] = {}
    state = {"batch": 0, "x": {}, "nonzero": {g[0][0]: False for g in groups}}
    mods = dict(model.named_modules())
    last = names[-1]

    def pre(name):
        lead = lead_of[name]

        def hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            i = state["batch"]
            if name == lead:
                state["x"][lead] = x
                _check_input(name, layers[name], x, what, i)
                state["nonzero"][lead] = state["nonzero"][lead] or bool(x.any())
            elif lead not in state["x"] or not _same_input(state["x"][lead], x):
                raise _GroupMismatch(name)
            rm = current_row_mask()
            m = rm.mask if rm is not None and rm.matches(x) else None
            xc = x.detach().to(stats[name].device, dtype)  # the statistics live on the layer's device
            if target == "reference":
                y = ref_out.pop(name, None)
                if y is None or y.shape[:-1] != x.shape[:-1]:
                    raise _InputError(f"calibrate_(target='reference'): the reference module {name!r} gave no output "
                                      f"of matching shape for {what} {i}; the reference must be the dense model the "
                                      f"converted one was made from")
            else:
                y = None  # C and yy follow from S (set_dense_target below)
            if y is not None or name == lead:
                stats[name].add(xc, y, m, inputs_shared=name != lead)
            if stop and name == last:
                raise _Stop

        return hook

    handles = [mods[n].register_forward_pre_hook(pre(n)) for n in names]
    ref_handles = []
    if target == "reference":
        rmods = dict(reference.named_modules())

        def post(name):
            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                b = getattr(module, "bias", None)
                dev = stats[name].device
                out = out.detach().to(dev, dtype)
                ref_out[name] = out - b.detach().to(dev, dtype) if b is not None else out
                if stop and name == last:
                    raise _Stop

            return hook

        for n in names:
            if n not in rmods:
                raise KeyError(f"calibrate_: reference model has no module {n!r}")
            ref_handles.append(rmods[n].register_forward_hook(post(n)))
    runs = batches if isinstance(batches, _Calls) else _Calls.of_model(model, batches)
    ref_runs = None
    if target == "reference":
        ref_runs = batches.ref_calls if isinstance(batches, _Calls) else _Calls.of_model(reference, batches, mask=False)
    try:
        with torch.no_grad():
            for i, call in enumerate(runs.calls):
                state["batch"] = i
                state["x"] = {}
                if ref_runs is not None:
                    try:
                        ref_runs.calls[i]()
                    except _Stop:
                        pass
                    except Exception as e:
                        raise _batch_error(e, i, runs.batches[i]) from e
                try:
                    call()
                except (_Stop,):
                    pass
                except (_GroupMismatch, _InputError):
                    raise
                except Exception as e:
                    raise _batch_error(e, i, runs.batches[i]) from e
    finally:
        for h in handles + ref_handles:
            h.remove()
    for lead, nz in state["nonzero"].items():
        if not nz:
            raise ValueError(f"calibrate_: layer {lead!r} received only zero inputs from all {what}es, so there is "
                             f"nothing to fit (the least-squares fit would set w_hat to 0); pass batches of real data")
    if target != "reference":
        for n in names:
            stats[n].set_dense_target(Wd[n])
    return stats


class _InputError(ValueError):
    """A bad calibration input (raised from inside a forward pass; not rewrapped as a model failure)."""


def _check_input(name: str, layer: STLinear, x: torch.Tensor, what: str, i: int) -> None:
    if x.shape[-1] != layer.in_features:
        raise _InputError(f"calibrate_: layer {name!r} expects inputs with {layer.in_features} features but got shape "
                         f"{tuple(x.shape)} from {what} {i}; pass batches the model accepts (the model's inputs, "
                         f"not this layer's)")
    if not torch.isfinite(x).all():
        raise _InputError(f"calibrate_: layer {name!r} received NaN or infinite inputs from {what} {i} (shape "
                          f"{tuple(x.shape)}); clean the batches (or the earlier layers that produce them)")


def calibrate_(
    model: nn.Module,
    batches,
    reference: nn.Module | None = None,
    alternate: int = 0,
    sequential: bool = True,
    layers: list[str] | None = None,
    fit_enc: bool = True,
    ridge: float | tuple = 1e-6,
    heldout=None,
    progress: bool = True,
    target: str = "dense",
    dtype="auto",
    method: str = "stats",
) -> CalibrationReport:
    """Fit the STLinear layers of ``model`` to real activations, in place; returns a report.

    Args:
        model: a model converted by :func:`strassenify_` (or any model holding STLinear layers).
        batches: batches of model inputs (tensor -> model(t), tuple -> model(*t), dict -> model(**t); a
            dict's ``attention_mask`` marks padding rows, which are not fitted). Any number: they are
            streamed, never held.
        reference: the dense model before conversion; its nn.Linear weights (matched by module name)
            define the targets. Without it each layer uses its ``dense_weight`` buffer.
        alternate: extra rounds of (D-step, E_x-step, w_hat-step) after the first w_hat fit
            (``fit_enc=False`` keeps E_x fixed and alternates D and w_hat only).
        sequential: fit layers one by one in the order the forward pass calls them, each on the inputs it
            sees in the converted model after the earlier layers were calibrated (default). ``False``
            records all layers in one pass (from ``reference`` if given, else from the converted model).
        layers: restrict to these STLinear module names.
        ridge: Tikhonov term relative to the mean diagonal of each normal-equation matrix. A tuple/list of
            values (needs ``heldout``) chooses one per layer: the value whose first w_hat fit has the lowest
            error on the held-out batches (layers with many unknowns per real row, e.g. wide inputs at high
            rank, overfit the batches with a small ridge); the report's ``ridge`` says which.
        heldout: optional batches (not used for fitting) on which the error is also reported.
        target: "dense": fit X W^T on the layer's own inputs X (W: the dense weight). "reference": fit the
            output of the same module of ``reference`` on the reference's own activations (minus its bias),
            so each layer also corrects the error that earlier converted layers left in X.
        dtype: of the streamed statistics: torch.float32, torch.float64, or "auto" (float64 when a
            layer's input Gram S is at most 512 x 512, i.e. K <= 128 at t=4; float32 above, where S and the
            solves are the cost). Float32 systems that are not numerically positive definite are solved again
            in float64.
        method: "stats" (default): stream the normal equations batch by batch (:class:`TileStats`);
            layers that receive the same input (query, key, value) share one input Gram. "data": the
            reference path that holds every activation (:class:`TileData`), float64.

    The objective per layer is ||Y - STL(X, w_hat)||_F over the real rows of the recorded inputs X
    (Y = X W^T, or the reference's outputs). Reported per layer: relative error ||.||/||Y|| and
    SQNR = 20 log10(1/rel.err) dB, before and after (from the float64 or float32 statistics: float32
    errors are accurate to about 1e-3 relative).
    """
    check_int("alternate", alternate, lo=0)
    ridges = tuple(ridge) if isinstance(ridge, (tuple, list)) else (ridge,)
    if not ridges or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0)
                         for v in ridges):
        raise ValueError(f"ridge must be a finite number >= 0 (relative Tikhonov term, default 1e-6) or a list of "
                         f"them to choose from on heldout=, got {ridge!r}")
    if len(ridges) > 1 and heldout is None:
        raise ValueError(f"ridge={list(ridges)} (several values) chooses per layer on held-out data: pass heldout= "
                         f"batches that are not in batches=, or a single ridge")
    if len(ridges) > 1 and method == "data":
        raise ValueError("method='data' takes a single ridge; several (chosen on heldout=) need method='stats'")
    ridge = ridges[0] if len(ridges) == 1 else ridges
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
    if target not in ("dense", "reference"):
        raise ValueError(f"target must be 'dense' or 'reference', got {target!r}")
    if target == "reference" and reference is None:
        raise ValueError("calibrate_(target='reference') needs reference=<the dense model before conversion>")
    if method not in ("stats", "data"):
        raise ValueError(f"method must be 'stats' or 'data', got {method!r}")
    if dtype not in ("auto", torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'auto', torch.float32 or torch.float64, got {dtype!r}")
    if method == "data":
        if target != "dense":
            raise ValueError("method='data' supports target='dense' only")
        return _calibrate_data(model, stl, batches, weights, reference, alternate, sequential, fit_enc, ridge,
                               heldout, progress, was_training)
    try:
        return _calibrate_stats(model, stl, batches, weights, reference, alternate, sequential, fit_enc, ridge,
                                heldout, progress, target, dtype)
    finally:
        model.train(was_training)


def _calibrate_data(model, stl, batches, weights, reference, alternate, sequential, fit_enc, ridge, heldout,
                    progress, was_training) -> CalibrationReport:
    """The reference driver: records every activation of a layer (float64) and fits with :class:`TileData`."""
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
            W = weights[name].cpu()  # the reference driver works in float64 on the CPU
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
            er, _, dr, _ = codec_ranks(layer)
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
                int((d.valid).sum()), rel0, sq0, rel1, sq1, hist, hb, ha, equations, unknowns, float(ridge), er, dr,
            ))
            bar.set_postfix(layer=name, err=f"{rel0:.3f}->{rel1:.3f}")
    finally:
        model.train(was_training)
    _warn_codec_rank(results, alternate, fit_enc)
    return CalibrationReport(results)


def _auto_dtype(layer: STLinear, dtype):
    if dtype != "auto":
        return dtype
    return torch.float64 if layer.row_tile * layer.tile * math.ceil(layer.in_features / layer.tile) <= 512 else torch.float32


def _stats_for(model, groups, batches, weights, dtype, what, reference, target, stop=True):
    """Statistics of every layer of ``groups`` (one pass); a group whose members turn out to read different
    inputs is split into single layers and streamed again."""
    try:
        return _stream_stats(model, groups, batches, weights, dtype, what, reference, target, stop)
    except _GroupMismatch:
        singles = [[m] for g in groups for m in g]
        return _stream_stats(model, singles, batches, weights, dtype, what, reference, target, stop)


def _fit_layer(name, layer, st, hst, alternate, fit_enc, ridge):
    """Fit one layer from its statistics; returns (LayerCalibration, (enc_x, w_hat, dec)).

    Each w_hat step also gives the error before it (of the previous factors) from the same normal equations,
    so the history costs no extra pass: ("w_hat", err) after each w_hat step, ("dec+enc_x", err) after the
    D and E_x steps of a round (err of the new D, E_x with the previous w_hat).
    """
    dt = st.dtype
    er, _, dr, _ = codec_ranks(layer)
    enc_x, dec, w_hat = (p.detach().to(st.device, dt) for p in (layer.enc_x, layer.dec, layer.w_hat))
    hb = stats_error(hst, enc_x, w_hat, dec)[0] if hst is not None else None
    if isinstance(ridge, tuple):  # choose on the held-out statistics, by the first w_hat fit
        ridge = min(ridge, key=lambda v: stats_error(hst, enc_x, fit_w_hat_stats(st, enc_x, dec, v), dec)[0])
    errs: list = []
    w_hat = fit_w_hat_stats(st, enc_x, dec, ridge, w_old=w_hat, errors=errs)
    (rel0, sq0), (rel1, sq1) = errs
    hist = [("w_hat", rel1)]
    for _ in range(alternate):
        dec = fit_dec_stats(st, enc_x, w_hat, ridge)
        if fit_enc:
            enc_x = fit_enc_x_stats(st, dec, w_hat, ridge)
        errs = []
        w_hat = fit_w_hat_stats(st, enc_x, dec, ridge, w_old=w_hat, errors=errs)
        hist += [("dec+enc_x" if fit_enc else "dec", errs[0][0]), ("w_hat", errs[1][0])]
        rel1, sq1 = errs[1]
    ha = stats_error(hst, enc_x, w_hat, dec)[0] if hst is not None else None
    rows = st.rows
    equations, unknowns = rows * layer.tile, layer.rank * st.Kt
    rep = LayerCalibration(name, f"{layer.in_features}->{layer.out_features}", layer.format, layer.rank, rows,
                           rel0, sq0, rel1, sq1, hist, hb, ha, equations, unknowns, float(ridge), er, dr)
    return rep, (enc_x, w_hat, dec)


def codec_ranks(layer: STLinear, rtol: float = 1e-4) -> tuple[int, int, int, int]:
    """(rank of E_x, full rank of E_x, rank of D, full rank of D) of an STLinear layer.

    An encoder E_x (r x n*m) of rank below min(r, n*m) never reads some directions of an input tile, a decoder
    D (n*p x r) of rank below min(r, n*p) never writes some directions of an output tile: no w_hat can make
    up for them, so a w_hat-only fit (``alternate=0``) keeps that error. Low-rank approximations of the
    matmul tensor (e.g. the "als" family at t=4 and ranks 16-24) often have such factors.
    """
    e, d = layer.enc_x.detach().double().cpu(), layer.dec.detach().double().cpu()
    rank = lambda a: int(torch.linalg.matrix_rank(a, rtol=rtol))  # noqa: E731
    return rank(e), min(e.shape), rank(d), min(d.shape)


def _warn_codec_rank(reports: list, alternate: int, fit_enc: bool, what: str = "calibrate_") -> None:
    """One warning for every layer whose E_x / D rank limits the fit and is not refitted."""
    bad = []
    for c in reports:
        if c.enc_rank is None:
            continue
        full_e, full_d = min(c.rank, c.format[0] * c.format[1]), min(c.rank, c.format[0] * c.format[2])
        enc_short = c.enc_rank < full_e and (alternate == 0 or not fit_enc)
        dec_short = c.dec_rank < full_d and alternate == 0
        if enc_short or dec_short:
            bad.append(f"{c.name} (E_x rank {c.enc_rank}/{full_e}, D rank {c.dec_rank}/{full_d})")
    if bad:
        warnings.warn(
            f"{what}: {len(bad)} layer(s) start from an encoder/decoder that misses tile directions, e.g. "
            f"{'; '.join(bad[:3])}; a w_hat-only fit cannot reach them and keeps that error. Pass alternate=1 "
            f"(or more) to refit D and E_x, or use another init (seed) whose factors have full rank",
            stacklevel=3)


def _warn_underdetermined(name, layer, st, ridge):
    rows = st.rows
    equations, unknowns = rows * layer.tile, layer.rank * st.Kt
    if equations < unknowns:
        warnings.warn(
            f"calibrate_: {name} is underdetermined: {rows} real rows give {equations} equations "
            f"per output column block for {unknowns} unknowns of w_hat, so the fit can match these batches "
            f"exactly and generalise badly. Pass more batches (>= {math.ceil(unknowns / layer.tile)} real "
            f"rows), a larger ridge= (now {ridge if isinstance(ridge, tuple) else f'{ridge:g}'}; e.g. 1e-2, or several "
            f"values with heldout= to choose from), and heldout= batches to see the error on unseen data",
            stacklevel=4)


class _Caches:
    """The block caches of the calibration (and heldout) batches; ``seek(name)`` advances them to the block
    holding layer ``name`` (None when a check failed: the caller then runs whole-model passes)."""

    def __init__(self, prefix, cal, held):
        self.prefix, self.cal, self.held = prefix, cal, held

    def block_of(self, name: str) -> int:
        return int(name[len(self.prefix) + 1:].split(".", 1)[0])

    def seek(self, name: str):
        bi = self.block_of(name)
        while self.cal.index < bi:
            ok = self.cal.advance()
            if self.held is not None:
                ok = self.held.advance() and ok
            if not ok:
                return None
        return self

    def calls(self):
        return self.cal.calls(), (self.held.calls() if self.held is not None else None)


def _block_caches(model, stl, groups, batches, heldout, reference, target):
    """Block caches when every STL layer sits in one list of repeated blocks (transformer layers), else None."""
    found = _find_blocks(model, [n for n, _ in stl])
    if found is None:
        return None
    prefix, blocks = found
    ref_blocks = None
    if target == "reference":
        try:
            ref_blocks = reference.get_submodule(prefix)
        except AttributeError:
            return None
        if not isinstance(ref_blocks, nn.ModuleList) or len(ref_blocks) != len(blocks):
            return None
    ref = reference if target == "reference" else None
    cal = _BlockCache(model, blocks, batches, ref, ref_blocks)
    held = _BlockCache(model, blocks, heldout, ref, ref_blocks) if heldout is not None else None
    if not cal.ok or (held is not None and not held.ok):
        return None
    caches = _Caches(prefix, cal, held)
    order = [caches.block_of(g[0][0]) for g in groups]
    if order != sorted(order):  # groups must visit the blocks in order
        return None
    return caches


def _calibrate_stats(model, stl, batches, weights, reference, alternate, sequential, fit_enc, ridge, heldout,
                     progress, target, dtype) -> CalibrationReport:
    src = model if sequential else (reference if reference is not None else model)
    groups = _execution_groups(model, stl, batches[0])  # same module names in the reference
    dtypes = {n: _auto_dtype(m, dtype) for n, m in stl}  # equal within a group (same format and input size)
    pre = pre_h = None
    if not sequential:
        pre, pre_h = {}, {}
        for dt in sorted({dtypes[g[0][0]] for g in groups}, key=str):
            gs = [g for g in groups if dtypes[g[0][0]] == dt]
            pre.update(_stats_for(src, gs, batches, weights, dt, "batch", reference, target))
            if heldout is not None:
                pre_h.update(_stats_for(src, gs, heldout, weights, dt, "heldout batch", reference, target))
    caches = _block_caches(model, stl, groups, batches, heldout, reference, target) if sequential else None
    results = []
    bar = tqdm(groups, desc="calibrate", disable=not progress, leave=False)
    for group in bar:
        dt = dtypes[group[0][0]]
        if pre is not None:
            stats = {n: pre[n] for n, _ in group}
            hstats = {n: pre_h.get(n) for n, _ in group} if heldout is not None else {}
        else:
            src, hsrc = batches, heldout
            if caches is not None:
                caches = caches.seek(group[0][0])
                if caches is not None:
                    src, hsrc = caches.calls()
            stats = _stats_for(model, [group], src, weights, dt, "batch", reference, target)
            hstats = (_stats_for(model, [group], hsrc, weights, dt, "heldout batch", reference, target)
                      if heldout is not None else {})
        for name, layer in group:
            _warn_underdetermined(name, layer, stats[name], ridge)
            rep, (enc_x, w_hat, dec) = _fit_layer(name, layer, stats[name], hstats.get(name), alternate, fit_enc, ridge)
            with torch.no_grad():
                layer.w_hat.copy_(w_hat.to(layer.w_hat))
                layer.dec.copy_(dec.to(layer.dec))
                layer.enc_x.copy_(enc_x.to(layer.enc_x))
            results.append(rep)
            bar.set_postfix(layer=name, err=f"{rep.rel_err_before:.3f}->{rep.rel_err_after:.3f}")
    order = {n: i for i, (n, _) in enumerate(stl)}
    results.sort(key=lambda c: order[c.name])  # report in module order
    _warn_codec_rank(results, alternate, fit_enc)
    return CalibrationReport(results)
