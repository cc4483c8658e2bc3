"""The catalogue of exact bilinear algorithms: ``get(name)``, ``available()``, ``register``.

Every entry is built from its published formulas (or from verified combinators: Kronecker
product, direct sum, symmetries) and is checked by ``verify()`` in the test-suite.
Names are case-insensitive. Formats are also addressable as ``"<n,m,p>"`` (the best entry
of that format) and ``"schoolbook:n,m,p"`` (the trivial algorithm of rank n*m*p).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

import numpy as np

from .bilinear import BilinearAlgorithm

__all__ = ["get", "available", "register", "schoolbook", "from_formulas"]

_REGISTRY: dict[str, Callable[[], BilinearAlgorithm]] = {}
_CACHE: dict[str, BilinearAlgorithm] = {}


def register(name: str):
    """Decorator: register a zero-argument builder of a BilinearAlgorithm under ``name``."""

    def deco(fn):
        _REGISTRY[name.lower()] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names of every catalogue entry (schoolbook of any size is available as ``schoolbook:n,m,p``)."""
    return sorted(_REGISTRY)


def get(name: str) -> BilinearAlgorithm:
    """Return the catalogue entry ``name`` (see :func:`available`), ``schoolbook:n,m,p`` or ``<n,m,p>``."""
    if not isinstance(name, str):
        raise TypeError(f"algorithm name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key.startswith("exact:"):
        key = key[len("exact:"):]
    if key in _CACHE:
        return _CACHE[key]
    if key.startswith("schoolbook:"):
        alg = schoolbook(*_parse_format(key.split(":", 1)[1], name))
    elif key.startswith("<"):
        fmt = _parse_format(key.strip("<>"), name)
        candidates = [get(k) for k in _REGISTRY]
        candidates = [a for a in candidates if a.format == fmt]
        alg = min(candidates, key=lambda a: a.rank) if candidates else schoolbook(*fmt)
    elif key in _REGISTRY:
        alg = _REGISTRY[key]()
    else:
        raise KeyError(
            f"unknown algorithm {name!r}; choose one of {available()}, 'schoolbook:n,m,p' or '<n,m,p>'"
        )
    _CACHE[key] = alg
    return alg


def _parse_format(text: str, original: str) -> tuple[int, int, int]:
    try:
        n, m, p = (int(x) for x in text.split(","))
    except ValueError:
        raise KeyError(f"cannot parse a format from {original!r}; write e.g. 'schoolbook:2,3,4'") from None
    if min(n, m, p) < 1:
        raise KeyError(f"format sizes must be >= 1 in {original!r}")
    return n, m, p


def schoolbook(n: int, m: int, p: int) -> BilinearAlgorithm:
    """The trivial algorithm for <n,m,p>: one product a_ij * b_jk per (i, j, k), rank n*m*p."""
    R = n * m * p
    U = np.zeros((n * m, R), dtype=np.int64)
    V = np.zeros((m * p, R), dtype=np.int64)
    W = np.zeros((n * p, R), dtype=np.int64)
    r = 0
    for i in range(n):
        for j in range(m):
            for k in range(p):
                U[i * m + j, r] = V[j * p + k, r] = W[i * p + k, r] = 1
                r += 1
    return BilinearAlgorithm(n, m, p, U, V, W, name=f"schoolbook:{n},{m},{p}", source="definition of the matrix product")


def from_formulas(n, m, p, products, outputs, name, source) -> BilinearAlgorithm:
    """Build factors from readable formulas.

    products: list of (A-terms, B-terms), each a dict {"a12": coeff} / {"b21": coeff} (1-based indices).
    outputs: dict {"c12": {product_index (1-based): coeff}}.
    """
    R = len(products)
    U = np.full((n * m, R), Fraction(0), dtype=object)
    V = np.full((m * p, R), Fraction(0), dtype=object)
    W = np.full((n * p, R), Fraction(0), dtype=object)
    for r, (aterms, bterms) in enumerate(products):
        for key, c in aterms.items():
            i, j = int(key[1]) - 1, int(key[2]) - 1
            U[i * m + j, r] += Fraction(c)
        for key, c in bterms.items():
            j, k = int(key[1]) - 1, int(key[2]) - 1
            V[j * p + k, r] += Fraction(c)
    for key, terms in outputs.items():
        i, k = int(key[1]) - 1, int(key[2]) - 1
        for r, c in terms.items():
            W[i * p + k, r - 1] += Fraction(c)
    return BilinearAlgorithm(n, m, p, U, V, W, name=name, source=source)


def _lin(text: str) -> dict:
    """Parse 'a11 + a22 - a21' into {'a11': 1, 'a22': 1, 'a21': -1}."""
    out: dict = {}
    sign = 1
    for tok in text.replace("-", " - ").replace("+", " + ").split():
        if tok == "+":
            sign = 1
        elif tok == "-":
            sign = -1
        else:
            out[tok] = out.get(tok, 0) + sign
            sign = 1
    return out


def _outs(spec: dict) -> dict:
    """{'c11': 'm1 + m4 - m5'} -> {'c11': {1: 1, 4: 1, 5: -1}}."""
    return {c: {int(k[1:]): v for k, v in _lin(expr).items()} for c, expr in spec.items()}


@register("strassen")
def strassen() -> BilinearAlgorithm:
    """Strassen 1969, <2,2,2;7>."""
    products = [
        ("a11 + a22", "b11 + b22"),
        ("a21 + a22", "b11"),
        ("a11", "b12 - b22"),
        ("a22", "b21 - b11"),
        ("a11 + a12", "b22"),
        ("a21 - a11", "b11 + b12"),
        ("a12 - a22", "b21 + b22"),
    ]
    outputs = {"c11": "m1 + m4 - m5 + m7", "c12": "m3 + m5", "c21": "m2 + m4", "c22": "m1 - m2 + m3 + m6"}
    return from_formulas(
        2, 2, 2, [(_lin(a), _lin(b)) for a, b in products], _outs(outputs),
        "strassen", "V. Strassen, Gaussian elimination is not optimal, Numer. Math. 13, 1969",
    )


@register("winograd")
def winograd() -> BilinearAlgorithm:
    """Winograd's variant of Strassen, <2,2,2;7> (7 multiplications, 15 additions)."""
    # s1 = a21 + a22, s2 = s1 - a11, s3 = a11 - a21, s4 = a12 - s2
    # t1 = b12 - b11, t2 = b22 - t1, t3 = b22 - b12, t4 = t2 - b21
    products = [
        ("a11", "b11"),
        ("a12", "b21"),
        ("a12 - a21 - a22 + a11", "b22"),  # s4 * b22
        ("a22", "b22 - b12 + b11 - b21"),  # a22 * t4
        ("a21 + a22", "b12 - b11"),  # s1 * t1
        ("a21 + a22 - a11", "b22 - b12 + b11"),  # s2 * t2
        ("a11 - a21", "b22 - b12"),  # s3 * t3
    ]
    # u2 = m1 + m6, u3 = u2 + m7, u4 = u2 + m5
    outputs = {
        "c11": "m1 + m2",
        "c12": "m1 + m6 + m5 + m3",
        "c21": "m1 + m6 + m7 - m4",
        "c22": "m1 + m6 + m7 + m5",
    }
    return from_formulas(
        2, 2, 2, [(_lin(a), _lin(b)) for a, b in products], _outs(outputs),
        "winograd", "S. Winograd, On multiplication of 2x2 matrices, Linear Algebra Appl. 4, 1971",
    )


@register("laderman")
def laderman() -> BilinearAlgorithm:
    """Laderman 1976, <3,3,3;23>, coefficients in {-1,0,1}."""
    products = [
        ("a11 + a12 + a13 - a21 - a22 - a32 - a33", "b22"),
        ("a11 - a21", "b22 - b12"),
        ("a22", "b12 + b21 - b11 - b22 - b23 - b31 + b33"),
        ("a21 + a22 - a11", "b11 - b12 + b22"),
        ("a21 + a22", "b12 - b11"),
        ("a11", "b11"),
        ("a31 + a32 - a11", "b11 - b13 + b23"),
        ("a31 - a11", "b13 - b23"),
        ("a31 + a32", "b13 - b11"),
        ("a11 + a12 + a13 - a22 - a23 - a31 - a32", "b23"),
        ("a32", "b13 + b21 - b11 - b22 - b23 - b31 + b32"),
        ("a32 + a33 - a13", "b22 + b31 - b32"),
        ("a13 - a33", "b22 - b32"),
        ("a13", "b31"),
        ("a32 + a33", "b32 - b31"),
        ("a22 + a23 - a13", "b23 + b31 - b33"),
        ("a13 - a23", "b23 - b33"),
        ("a22 + a23", "b33 - b31"),
        ("a12", "b21"),
        ("a23", "b32"),
        ("a21", "b13"),
        ("a31", "b12"),
        ("a33", "b33"),
    ]
    outputs = {
        "c11": "m6 + m14 + m19",
        "c12": "m1 + m4 + m5 + m6 + m12 + m14 + m15",
        "c13": "m6 + m7 + m9 + m10 + m14 + m16 + m18",
        "c21": "m2 + m3 + m4 + m6 + m14 + m16 + m17",
        "c22": "m2 + m4 + m5 + m6 + m20",
        "c23": "m14 + m16 + m17 + m18 + m21",
        "c31": "m6 + m7 + m8 + m11 + m12 + m13 + m14",
        "c32": "m12 + m13 + m14 + m15 + m22",
        "c33": "m6 + m7 + m8 + m9 + m23",
    }
    return from_formulas(
        3, 3, 3, [(_lin(a), _lin(b)) for a, b in products], _outs(outputs),
        "laderman",
        "J. D. Laderman, A noncommutative algorithm for multiplying 3x3 matrices using 23 "
        "multiplications, Bull. AMS 82(1), 1976",
    )


@register("strassen_x_strassen")
def strassen_x_strassen() -> BilinearAlgorithm:
    """<4,4,4;49>: Strassen applied to 2x2 blocks, Strassen inside each block product."""
    return strassen().kron(strassen(), name="strassen_x_strassen")


@register("strassen_x_winograd")
def strassen_x_winograd() -> BilinearAlgorithm:
    """<4,4,4;49> with Winograd's variant inside the blocks."""
    return strassen().kron(winograd(), name="strassen_x_winograd")


@register("strassen_2x2x3")
def strassen_2x2x3() -> BilinearAlgorithm:
    """<2,2,3;11>: Strassen on the first two columns of B plus a schoolbook matrix-vector product (optimal rank 11)."""
    return strassen().concat(schoolbook(2, 2, 1), "p", name="strassen_2x2x3")


@register("strassen_2x3x2")
def strassen_2x3x2() -> BilinearAlgorithm:
    """<2,3,2;11> by the cyclic symmetry of <2,2,3;11>."""
    a = strassen_2x2x3().cyclic()
    return _renamed(a, "strassen_2x3x2")


@register("strassen_3x2x2")
def strassen_3x2x2() -> BilinearAlgorithm:
    """<3,2,2;11> by the transpose symmetry of <2,2,3;11>."""
    return _renamed(strassen_2x2x3().transpose(), "strassen_3x2x2")


@register("strassen_2x2x4")
def strassen_2x2x4() -> BilinearAlgorithm:
    """<2,2,4;14>: two Strassens side by side (best known rank 14)."""
    return strassen().concat(strassen(), "p", name="strassen_2x2x4")


@register("strassen_2x4x2")
def strassen_2x4x2() -> BilinearAlgorithm:
    """<2,4,2;14>: two Strassens along the inner dimension (partial products added)."""
    return strassen().concat(strassen(), "m", name="strassen_2x4x2")


@register("strassen_4x2x2")
def strassen_4x2x2() -> BilinearAlgorithm:
    """<4,2,2;14>: two Strassens stacked along the rows."""
    return strassen().concat(strassen(), "n", name="strassen_4x2x2")


@register("strassen_4x4x2")
def strassen_4x4x2() -> BilinearAlgorithm:
    """<4,4,2;28>: Strassen <2,2,2;7> on 2x2 blocks, each block product a schoolbook <2,2,1;4>."""
    return strassen().kron(schoolbook(2, 2, 1), name="strassen_4x4x2")


@register("strassen_2x4x4")
def strassen_2x4x4() -> BilinearAlgorithm:
    """<2,4,4;28>: <1,2,2;4> (x) Strassen (best known 26)."""
    return schoolbook(1, 2, 2).kron(strassen(), name="strassen_2x4x4")


@register("laderman_3x3x6")
def laderman_3x3x6() -> BilinearAlgorithm:
    """<3,3,6;46>: two Laderman products side by side (best known 40)."""
    return laderman().concat(laderman(), "p", name="laderman_3x3x6")


@register("strassen_x_laderman")
def strassen_x_laderman() -> BilinearAlgorithm:
    """<6,6,6;161>: Strassen on 2x2 blocks of Laderman 3x3 products."""
    return strassen().kron(laderman(), name="strassen_x_laderman")


def _renamed(a: BilinearAlgorithm, name: str) -> BilinearAlgorithm:
    return BilinearAlgorithm(a.n, a.m, a.p, a.U, a.V, a.W, name=name, source=a.source)


# --------------------------------------------------------------------------- user-supplied catalogues
def _rationalize(a: np.ndarray, max_denominator: int) -> np.ndarray | None:
    """Exact Fractions if every float entry is a rational with a small denominator, else None."""
    out = np.empty(a.shape, dtype=object)
    for idx, v in np.ndenumerate(np.asarray(a, dtype=np.float64)):
        f = Fraction(float(v)).limit_denominator(max_denominator)
        if float(f) != float(v):
            return None
        out[idx] = f
    return out


def load_alphatensor_npz(path, cyclic: bool = True, max_denominator: int = 1024, strict: bool = True) -> dict[str, BilinearAlgorithm]:
    """Load factorizations from a user-supplied npz in AlphaTensor's layout.

    The file maps keys ``"n,m,p"`` to a sequence (U, V, W) of arrays of shapes (n*m, R), (m*p, R),
    (n*p, R). With ``cyclic=True`` (AlphaTensor's convention, T[i m + j, j p + k, k n + i] = 1) W is
    converted to standard form: W_std = W.reshape(p, n, R).transpose(1, 0, 2).reshape(n p, R).
    Entries that are rationals with denominator <= ``max_denominator`` are stored exactly and every
    result is checked with :meth:`BilinearAlgorithm.verify`; with ``strict=True`` a failure raises.
    Returns {"<n,m,p;R>": algorithm}; register the ones you want with :func:`register`.

    AlphaTensor's files hold object arrays, which numpy reads with pickle: load only files you trust.
    """
    import pickle
    import zipfile

    try:
        data = np.load(path, allow_pickle=True)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an npz archive")
    except (OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable npz file: {e}") from None
    out: dict[str, BilinearAlgorithm] = {}
    for key in data.files:
        try:
            n, m, p = (int(v) for v in key.split(","))
            U, V, W = (np.asarray(f) for f in data[key])
        except (ValueError, TypeError):
            raise ValueError(
                f"{path}: entry {key!r} is not in AlphaTensor's layout (key 'n,m,p' -> (U, V, W)); "
                f"this loader reads only that layout"
            ) from None
        want = {"U": (n * m, "n*m"), "V": (m * p, "m*p"), "W": (n * p, "n*p")}
        R = U.shape[-1] if U.ndim == 2 else None
        for label, f in (("U", U), ("V", V), ("W", W)):
            rows, expr = want[label]
            if f.ndim != 2 or f.shape[0] != rows or f.shape[1] != R:
                raise ValueError(
                    f"{path}: entry {key!r}: {label} has shape {tuple(f.shape)}, but <{n},{m},{p}> needs ({expr}={rows}, R) "
                    f"with the same rank R for U, V and W (U: {tuple(U.shape)}, V: {tuple(V.shape)}, W: {tuple(W.shape)})"
                )
        if cyclic:
            W = W.reshape(p, n, R).transpose(1, 0, 2).reshape(n * p, R)
        exact = [_rationalize(f, max_denominator) for f in (U, V, W)]
        factors = exact if all(e is not None for e in exact) else [U, V, W]
        alg = BilinearAlgorithm(n, m, p, *factors, name=f"file:{n},{m},{p};{R}", source=f"loaded from {path} [{key}]")
        if not alg.verify():
            if strict:
                raise ValueError(
                    f"{path}: entry {key!r} does not verify exactly as <{n},{m},{p};{R}> "
                    f"(wrong convention? try cyclic={not cyclic}; or strict=False to keep it as an approximation)"
                )
        out[f"<{n},{m},{p};{R}>"] = alg
    return out
