"""Bilinear matrix multiplication algorithms in standard form.

A bilinear algorithm for the format <n,m,p> (A: n x m, B: m x p, C = A B, all flattened
row-major) with rank R is a triple of factor matrices

    U: (n*m, R),  V: (m*p, R),  W: (n*p, R)

such that ``vec(C) = W @ ((U.T @ vec(A)) * (V.T @ vec(B)))``. Equivalently
``sum_r U[:, r] (x) V[:, r] (x) W[:, r] = T<n,m,p>`` with ``T[i*m+j, j*p+k, i*p+k] = 1``.

Exact factors are stored as numpy object arrays of ``fractions.Fraction`` so that
:meth:`BilinearAlgorithm.verify` is a proof (rational arithmetic), not a float check.
Approximate factors (from :func:`strassenkit.algorithms.approximate`) are float64 arrays.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from math import lcm

import numpy as np
import torch

__all__ = ["BilinearAlgorithm", "matmul_tensor", "tensor_residual"]


def matmul_tensor(n: int, m: int, p: int) -> np.ndarray:
    """The <n,m,p> matrix multiplication tensor, int64 array of shape (n*m, m*p, n*p)."""
    t = np.zeros((n * m, m * p, n * p), dtype=np.int64)
    for i in range(n):
        for j in range(m):
            for k in range(p):
                t[i * m + j, j * p + k, i * p + k] = 1
    return t


def _as_factor(x, rows: int, name: str) -> np.ndarray:
    """Convert a factor matrix to exact Fractions when every entry is rational, else float64."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, rank), got {tuple(arr.shape)}")
    if arr.dtype.kind not in "iufO":
        raise TypeError(
            f"{name} must hold real numbers (ints, floats or fractions.Fraction), got dtype {arr.dtype}"
            f"{' (strings)' if arr.dtype.kind in 'US' else ''}; convert it first, e.g. "
            f"np.vectorize(fractions.Fraction)({name}) for exact entries"
        )
    if arr.dtype.kind in "iu" or arr.dtype == object:
        out = np.empty(arr.shape, dtype=object)
        for idx, v in np.ndenumerate(arr):
            if arr.dtype == object and (isinstance(v, bool) or not isinstance(v, (numbers.Rational, float, np.floating))):
                raise TypeError(f"{name}[{idx[0]}, {idx[1]}] is {v!r} ({type(v).__name__}); factor entries must be "
                                f"ints, floats or fractions.Fraction")
            if isinstance(v, (float, np.floating)) and not np.isfinite(v):
                raise ValueError(f"{name} contains NaN or infinite entries")
            out[idx] = Fraction(v)
        return out
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return arr


def _is_exact_array(a: np.ndarray) -> bool:
    return a.dtype == object


def _integer_scaled(a: np.ndarray) -> tuple[np.ndarray, int]:
    """Scale a Fraction array by the lcm of its denominators; return (Python-int object array, scale)."""
    den = 1
    for v in a.flat:
        den = lcm(den, v.denominator)
    out = np.empty(a.shape, dtype=object)
    for idx, v in np.ndenumerate(a):
        out[idx] = int(v * den)
    return out, den


@dataclass(frozen=True, eq=False)
class BilinearAlgorithm:
    """Factor matrices (U, V, W) of a bilinear algorithm for <n,m,p> in standard form.

    Attributes:
        n, m, p: the format: A is n x m, B is m x p.
        U: (n*m, R) encoder of A.  V: (m*p, R) encoder of B.  W: (n*p, R) decoder of C.
        name: catalogue name, e.g. ``"strassen"``.
        source: where it comes from (paper and year, or how it was computed).
    """

    n: int
    m: int
    p: int
    U: np.ndarray
    V: np.ndarray
    W: np.ndarray
    name: str = "unnamed"
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for dim, label in ((self.n, "n"), (self.m, "m"), (self.p, "p")):
            if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
                raise ValueError(f"{label} must be a positive integer, got {dim!r}")
        U = _as_factor(self.U, self.n * self.m, "U")
        V = _as_factor(self.V, self.m * self.p, "V")
        W = _as_factor(self.W, self.n * self.p, "W")
        if not (U.shape[1] == V.shape[1] == W.shape[1]) or U.shape[1] < 1:
            raise ValueError(
                f"U, V, W must share the same rank >= 1, got {U.shape[1]}, {V.shape[1]}, {W.shape[1]}"
            )
        if not (_is_exact_array(U) and _is_exact_array(V) and _is_exact_array(W)):
            U, V, W = (np.asarray(x, dtype=np.float64) for x in (U, V, W))
        object.__setattr__(self, "U", U)
        object.__setattr__(self, "V", V)
        object.__setattr__(self, "W", W)

    # ----------------------------------------------------------------- basics
    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def format(self) -> tuple[int, int, int]:
        return (self.n, self.m, self.p)

    @property
    def is_rational(self) -> bool:
        """True when the factors are stored exactly (Fractions), so verify() is a proof."""
        return _is_exact_array(self.U)

    def __repr__(self) -> str:
        return (
            f"BilinearAlgorithm(name={self.name!r}, format=<{self.n},{self.m},{self.p}>, "
            f"rank={self.rank}, source={self.source!r})"
        )

    def factors(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, V, W) as torch tensors of the given dtype."""
        return tuple(torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype) for x in (self.U, self.V, self.W))

    def stl_matrices(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E_x, E_w, D) = (U.T, V.T, W) as used by the STL operator: shapes (R, n*m), (R, m*p), (n*p, R)."""
        U, V, W = self.factors(dtype)
        return U.T.contiguous(), V.T.contiguous(), W.contiguous()

    # ----------------------------------------------------------------- verify
    def reconstruct(self) -> np.ndarray:
        """sum_r U[:,r] (x) V[:,r] (x) W[:,r]; exact (object array of Fractions) when rational."""
        if self.is_rational:
            u, su = _integer_scaled(self.U)
            v, sv = _integer_scaled(self.V)
            w, sw = _integer_scaled(self.W)
            t = np.einsum("ar,br,cr->abc", u, v, w, optimize=False)
            scale = Fraction(1, su * sv * sw)
            return np.vectorize(lambda x: Fraction(x) * scale, otypes=[object])(t)
        return np.einsum("ar,br,cr->abc", self.U, self.V, self.W)

    def verify(self) -> bool:
        """Exact check of the tensor identity in rational arithmetic.

        Returns False for float (approximate) factors even when they are numerically close:
        a floating-point check is not a proof. Use :meth:`residual` for approximations.
        """
        if not self.is_rational:
            return False
        u, su = _integer_scaled(self.U)
        v, sv = _integer_scaled(self.V)
        w, sw = _integer_scaled(self.W)
        t = np.einsum("ar,br,cr->abc", u, v, w, optimize=False)
        target = matmul_tensor(self.n, self.m, self.p).astype(object) * (su * sv * sw)
        return bool((t == target).all())

    def residual(self) -> float:
        """Relative Frobenius residual ||T - T_R|| / ||T|| (0 for exact algorithms)."""
        return tensor_residual(self)

    @cached_property
    def coefficient_set(self) -> frozenset:
        vals = set()
        for a in (self.U, self.V, self.W):
            vals.update(Fraction(x) if self.is_rational else float(x) for x in a.flat)
        return frozenset(vals)

    def is_ternary(self) -> bool:
        """True when every coefficient is in {-1, 0, 1}."""
        return self.is_rational and self.coefficient_set <= {Fraction(-1), Fraction(0), Fraction(1)}

    # ----------------------------------------------------------------- combinators
    def kron(self, other: "BilinearAlgorithm", name: str | None = None) -> "BilinearAlgorithm":
        """Tensor product: <n1,m1,p1;R1> (x) <n2,m2,p2;R2> = <n1 n2, m1 m2, p1 p2; R1 R2>.

        ``self`` acts on the outer block structure and ``other`` inside the blocks: index
        ``i = i1 * n2 + i2`` etc., matching a matrix viewed as an n1 x m1 grid of n2 x m2 blocks.
        """

        def kr(a, b, r1, c1, r2, c2):
            a4 = a.reshape(r1, c1, -1)
            b4 = b.reshape(r2, c2, -1)
            out = np.einsum("ijr,kls->ikjlrs", a4, b4)
            return out.reshape(r1 * r2 * c1 * c2, -1)

        n1, m1, p1 = self.format
        n2, m2, p2 = other.format
        U = kr(self.U, other.U, n1, m1, n2, m2)
        V = kr(self.V, other.V, m1, p1, m2, p2)
        W = kr(self.W, other.W, n1, p1, n2, p2)
        return BilinearAlgorithm(
            n1 * n2, m1 * m2, p1 * p2, U, V, W,
            name=name or f"{self.name}x{other.name}",
            source=f"tensor (Kronecker) product of {self.name} and {other.name}",
        )

    def transpose(self) -> "BilinearAlgorithm":
        """<n,m,p> -> <p,m,n> from C^T = B^T A^T: U' = V^T-reindexed, V' = U^T-reindexed, W' = W^T-reindexed."""
        n, m, p = self.format

        def t(a, r, c):
            return a.reshape(r, c, -1).transpose(1, 0, 2).reshape(r * c, -1)

        return BilinearAlgorithm(
            p, m, n, t(self.V, m, p), t(self.U, n, m), t(self.W, n, p),
            name=f"{self.name}.T", source=f"transpose symmetry of {self.name}",
        )

    def cyclic(self) -> "BilinearAlgorithm":
        """Cyclic symmetry <n,m,p> -> <m,p,n> (from trace(ABC) = trace(BCA))."""
        n, m, p = self.format
        # cyclic form: T_cyc[(i,j),(j,k),(k,i)]; our W is indexed (i,k), i.e. W_cyc = W^T-reindexed.
        w_cyc = self.W.reshape(n, p, -1).transpose(1, 0, 2).reshape(p * n, -1)
        # rotating (U, V, W_cyc) -> (V, W_cyc, U) decomposes <m,p,n> in cyclic form.
        u2, v2, w2_cyc = self.V, w_cyc, self.U
        w2 = w2_cyc.reshape(n, m, -1).transpose(1, 0, 2).reshape(m * n, -1)
        return BilinearAlgorithm(
            m, p, n, u2, v2, w2, name=f"{self.name}.cyc", source=f"cyclic symmetry of {self.name}",
        )

    def concat(self, other: "BilinearAlgorithm", axis: str, name: str | None = None) -> "BilinearAlgorithm":
        """Direct sum along one dimension: split the matrices into two blocks along ``axis``.

        axis "n": <n1,m,p> + <n2,m,p> = <n1+n2,m,p>;  "p": columns of B and C;  "m": the inner
        dimension (the two partial products are added).  Rank R1 + R2.
        """
        n1, m1, p1 = self.format
        n2, m2, p2 = other.format
        if axis == "n" and (m1, p1) == (m2, p2):
            n, m, p = n1 + n2, m1, p1
            rowsA = [(i, j, 0, i, j) for i in range(n1) for j in range(m)] + [(i + n1, j, 1, i, j) for i in range(n2) for j in range(m)]
            rowsB = [(j, k, 2, j, k) for j in range(m) for k in range(p)]
            rowsC = [(i, k, 0, i, k) for i in range(n1) for k in range(p)] + [(i + n1, k, 1, i, k) for i in range(n2) for k in range(p)]
        elif axis == "p" and (n1, m1) == (n2, m2):
            n, m, p = n1, m1, p1 + p2
            rowsA = [(i, j, 2, i, j) for i in range(n) for j in range(m)]
            rowsB = [(j, k, 0, j, k) for j in range(m) for k in range(p1)] + [(j, k + p1, 1, j, k) for j in range(m) for k in range(p2)]
            rowsC = [(i, k, 0, i, k) for i in range(n) for k in range(p1)] + [(i, k + p1, 1, i, k) for i in range(n) for k in range(p2)]
        elif axis == "m" and (n1, p1) == (n2, p2):
            n, m, p = n1, m1 + m2, p1
            rowsA = [(i, j, 0, i, j) for i in range(n) for j in range(m1)] + [(i, j + m1, 1, i, j) for i in range(n) for j in range(m2)]
            rowsB = [(j, k, 0, j, k) for j in range(m1) for k in range(p)] + [(j + m1, k, 1, j, k) for j in range(m2) for k in range(p)]
            rowsC = [(i, k, 2, i, k) for i in range(n) for k in range(p)]
        else:
            raise ValueError(f"cannot concatenate <{n1},{m1},{p1}> and <{n2},{m2},{p2}> along {axis!r}")
        R1, R2 = self.rank, other.rank
        exact = self.is_rational and other.is_rational

        def build(rows, cols_dim, f1, f2, dims1, dims2):
            size = len(rows)
            out = np.empty((size, R1 + R2), dtype=object) if exact else np.zeros((size, R1 + R2))
            if exact:
                out[:] = Fraction(0)
            for a, b, which, x, y in rows:
                idx = a * cols_dim + b
                if which in (0, 2):
                    out[idx, :R1] = f1[x * dims1 + y]
                if which in (1, 2):
                    out[idx, R1:] = f2[x * dims2 + y]
            return out

        U = build(rowsA, m, self.U, other.U, m1, m2)
        V = build(rowsB, p, self.V, other.V, p1, p2)
        W = build(rowsC, p, self.W, other.W, p1, p2)
        return BilinearAlgorithm(
            n, m, p, U, V, W, name=name or f"{self.name}+{other.name}",
            source=f"direct sum along {axis} of {self.name} and {other.name}",
        )


def tensor_residual(alg: BilinearAlgorithm) -> float:
    """Relative Frobenius residual of the algorithm's tensor against <n,m,p>."""
    T = matmul_tensor(*alg.format).astype(np.float64)
    R = np.einsum(
        "ar,br,cr->abc",
        np.asarray(alg.U, dtype=np.float64),
        np.asarray(alg.V, dtype=np.float64),
        np.asarray(alg.W, dtype=np.float64),
    )
    return float(np.linalg.norm(T - R) / np.linalg.norm(T))
