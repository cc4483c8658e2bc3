"""Numerical search for exact bilinear algorithms, proven by exact rational verification.

``search(n, m, p, rank, seed=0, attempts=..., time_limit=...)`` runs independent attempts, each:

1. **Real decomposition.** Regularized alternating least squares (ALS) from a random start: Tikhonov
   weight 1e-2 decayed geometrically per sweep (the regularization keeps the factors bounded, steering
   away from border-rank solutions whose terms diverge), columns balanced every sweep. The attempt
   continues only when the squared residual falls below 1e-10.
2. **Discretization.** The exact solutions form a continuous family (the symmetry group
   GL_n x GL_m x GL_p acts on them), so we move along it toward integer coefficients: every sweep
   rescales each product so that its A- and B-encoders have max-abs entry 1, then solves ALS steps
   with an extra attraction term ``mu ||X - round(X)||^2`` toward the nearest integers, with mu growing
   geometrically (a Levenberg-Marquardt-like damping toward the lattice). Every few sweeps we round.
3. **Proof.** Rounded factors are accepted only if :meth:`BilinearAlgorithm.verify` (exact rational
   arithmetic) passes. When U and V round cleanly but W does not, W is solved exactly over the
   rationals from (U, V) (the tensor is linear in W) and the result is verified again.

Returns the first verified algorithm or None; ``search_stats`` gives the success rate over seeds.
Measured on this 2-core machine (see ``tests/algorithms/test_search.py`` and the module's report):
<2,2,2;7> succeeds from most random starts in about a second; <3,3,3;23> needs minutes.
"""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from .approximate import balance, khatri_rao
from .bilinear import BilinearAlgorithm, matmul_tensor

__all__ = ["search", "search_attempt", "attempt_rng", "search_stats", "exact_decoder", "save_algorithm", "load_algorithm"]


def _unfoldings(T):
    a, b, c = T.shape
    return T.reshape(a, b * c), T.transpose(1, 0, 2).reshape(b, a * c), T.transpose(2, 0, 1).reshape(c, a * b)


def exact_decoder(U, V, n: int, m: int, p: int):
    """Solve W exactly (Fractions) from integer/rational encoders U (nm, r), V (mp, r), or None if inconsistent.

    The tensor identity reads K @ W.T = T3.T with K = khatri_rao(U, V) (nm*mp, r) and T3 (np, nm*mp),
    a linear system solved by fraction-exact Gaussian elimination; free variables are set to 0.
    """
    Uf = np.array([[Fraction(x) for x in row] for row in np.asarray(U, dtype=object)], dtype=object)
    Vf = np.array([[Fraction(x) for x in row] for row in np.asarray(V, dtype=object)], dtype=object)
    r = Uf.shape[1]
    K = (Uf[:, None, :] * Vf[None, :, :]).reshape(-1, r)
    T = matmul_tensor(n, m, p)
    T3 = T.transpose(2, 0, 1).reshape(n * p, -1)
    rows = [list(K[i]) + [Fraction(int(v)) for v in T3[:, i]] for i in range(K.shape[0])]
    ncols, nrhs = r, n * p
    piv_cols, row = [], 0
    for col in range(ncols):
        pr = next((i for i in range(row, len(rows)) if rows[i][col] != 0), None)
        if pr is None:
            continue
        rows[row], rows[pr] = rows[pr], rows[row]
        inv = 1 / rows[row][col]
        rows[row] = [x * inv for x in rows[row]]
        for i in range(len(rows)):
            if i != row and rows[i][col] != 0:
                f = rows[i][col]
                rows[i] = [a - f * b for a, b in zip(rows[i], rows[row])]
        piv_cols.append(col)
        row += 1
    for i in range(row, len(rows)):  # consistency: zero rows must have zero right-hand sides
        if any(x != 0 for x in rows[i][ncols:]):
            return None
    W = np.full((nrhs, r), Fraction(0), dtype=object)
    for i, col in enumerate(piv_cols):
        for k in range(nrhs):
            W[k, col] = rows[i][ncols + k]
    return W


def _to_exact(X) -> np.ndarray:
    return np.vectorize(lambda v: Fraction(int(v)), otypes=[object])(np.round(X))


def search_attempt(
    n: int,
    m: int,
    p: int,
    rank: int,
    rng: np.random.Generator,
    als_sweeps: int = 6000,
    round_sweeps: int = 1500,
    decay: float = 0.995,
    give_up: tuple[int, float] | None = (2000, 0.3),
) -> tuple[BilinearAlgorithm | None, str]:
    """One random start; returns (verified algorithm or None, a short status string)."""
    T = matmul_tensor(n, m, p).astype(np.float64)
    T1, T2, T3 = _unfoldings(T)
    a, b, c = T.shape
    eye = np.eye(rank)
    U = rng.normal(size=(a, rank)) / np.sqrt(a)
    V = rng.normal(size=(b, rank)) / np.sqrt(b)
    W = rng.normal(size=(c, rank)) / np.sqrt(c)

    def err(U, V, W):
        return float(np.sum((T3 - W @ khatri_rao(U, V).T) ** 2))

    try:
        U, V, W, e = _als_phase(T1, T2, T3, U, V, W, eye, als_sweeps, decay, err, give_up)
    except np.linalg.LinAlgError:
        return None, "ALS hit a singular system"
    if e >= 1e-6:
        return None, f"no real decomposition (residual^2 {e:.2g})"
    try:
        return _round_phase(T, T1, T2, T3, U, V, W, n, m, p, rank, round_sweeps, err)
    except np.linalg.LinAlgError:
        return None, "rounding phase hit a singular system"


def _als_phase(T1, T2, T3, U, V, W, eye, als_sweeps, decay, err, give_up):
    lam, e = 1e-2, np.inf
    for s in range(als_sweeps):
        U, V, W = balance(U, V, W)
        U = np.linalg.solve((V.T @ V) * (W.T @ W) + lam * eye, (T1 @ khatri_rao(V, W)).T).T
        V = np.linalg.solve((U.T @ U) * (W.T @ W) + lam * eye, (T2 @ khatri_rao(U, W)).T).T
        W = np.linalg.solve((U.T @ U) * (V.T @ V) + lam * eye, (T3 @ khatri_rao(U, V)).T).T
        lam = max(lam * decay, 1e-12)
        if s % 25 == 24:
            e = err(U, V, W)
            if e < 1e-10:
                break
            if give_up is not None and s + 1 >= give_up[0] and e > give_up[1]:  # stuck: give up early
                break
    return U, V, W, e


def _round_phase(T, T1, T2, T3, U, V, W, n, m, p, rank, round_sweeps, err):
    eye = np.eye(rank)
    mu = 1e-4
    for s in range(round_sweeps):
        su = np.abs(U).max(0)
        sv = np.abs(V).max(0)
        su, sv = np.where(su > 0, su, 1.0), np.where(sv > 0, sv, 1.0)
        U, V, W = U / su, V / sv, W * (su * sv)
        U = np.linalg.solve((V.T @ V) * (W.T @ W) + mu * eye, (T1 @ khatri_rao(V, W)).T + mu * np.round(U).T).T
        V = np.linalg.solve((U.T @ U) * (W.T @ W) + mu * eye, (T2 @ khatri_rao(U, W)).T + mu * np.round(V).T).T
        W = np.linalg.solve((U.T @ U) * (V.T @ V) + mu * eye, (T3 @ khatri_rao(U, V)).T + mu * np.round(W).T).T
        mu = min(mu * 1.02, 10.0)
        if s % 10 == 9:
            Ur, Vr, Wr = np.round(U), np.round(V), np.round(W)
            if err(Ur, Vr, Wr) < 0.5:  # integer factors: the float check is exact here, verify() proves it
                alg = BilinearAlgorithm(n, m, p, _to_exact(Ur), _to_exact(Vr), _to_exact(Wr), name="search")
                if alg.verify():
                    return alg, f"integer factors after {s + 1} rounding sweeps"
            if np.abs(U - Ur).max() < 1e-3 and np.abs(V - Vr).max() < 1e-3:
                Wx = exact_decoder(_to_exact(Ur), _to_exact(Vr), n, m, p)
                if Wx is not None:
                    alg = BilinearAlgorithm(n, m, p, _to_exact(Ur), _to_exact(Vr), Wx, name="search")
                    if alg.verify():
                        return alg, f"integer encoders, exact rational decoder after {s + 1} sweeps"
    return None, f"real decomposition found but rounding failed (residual^2 {err(U, V, W):.2g})"


def attempt_rng(seed: int, n: int, m: int, p: int, rank: int) -> np.random.Generator:
    """The random generator of one attempt: attempt k of ``search(seed=s)`` uses ``attempt_rng(s + k, ...)``."""
    return np.random.default_rng([seed, n, m, p, rank])


def search(
    n: int,
    m: int,
    p: int,
    rank: int,
    seed: int = 0,
    attempts: int = 50,
    time_limit: float | None = None,
    progress: bool = True,
    **kwargs,
) -> BilinearAlgorithm | None:
    """Search for an exact <n,m,p> algorithm with ``rank`` products; a verified algorithm or None.

    Runs up to ``attempts`` random starts (attempt k uses ``attempt_rng(seed + k, ...)``, so results are
    deterministic given ``seed`` on one machine) or until ``time_limit`` seconds.
    The result's ``meta`` records the attempt index, the time spent and the status of every attempt.
    """
    for label, v in (("n", n), ("m", m), ("p", p), ("rank", rank), ("attempts", attempts)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {v!r}")
    if rank >= n * m * p:
        raise ValueError(f"rank={rank} >= n*m*p={n * m * p}: the schoolbook algorithm already does it; search below it")
    t0 = time.perf_counter()
    log = []
    it = range(attempts)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"search <{n},{m},{p};{rank}> seed={seed}", leave=False, disable=None)
    for k in it:
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        alg, status = search_attempt(n, m, p, rank, attempt_rng(seed + k, n, m, p, rank), **kwargs)
        log.append(status)
        if alg is not None:
            name = f"search_{n}x{m}x{p}_r{rank}"
            return BilinearAlgorithm(
                n, m, p, alg.U, alg.V, alg.W, name=name,
                source=f"strassenkit.algorithms.search (ALS + integer rounding), seed {seed}, attempt {k} "
                f"(attempt_rng({seed + k}, {n}, {m}, {p}, {rank}))",
                meta={"seed": seed, "attempt": k, "seconds": time.perf_counter() - t0, "log": log},
            )
    return None


def search_stats(n: int, m: int, p: int, rank: int, seeds, **kwargs) -> dict:
    """Run one attempt per seed; returns {"successes", "tries", "rate", "seconds_per_try", "statuses"}."""
    ok, statuses, t0 = 0, [], time.perf_counter()
    seeds = list(seeds)
    for s in seeds:
        alg, status = search_attempt(n, m, p, rank, attempt_rng(s, n, m, p, rank), **kwargs)
        ok += alg is not None and alg.verify()
        statuses.append(status)
    dt = time.perf_counter() - t0
    return {"successes": ok, "tries": len(seeds), "rate": ok / max(len(seeds), 1),
            "seconds_per_try": dt / max(len(seeds), 1), "statuses": statuses}


# --------------------------------------------------------------------------- JSON storage of found algorithms
def save_algorithm(alg: BilinearAlgorithm, path) -> None:
    """Write a verified algorithm as JSON (factors as strings of exact fractions)."""
    if not alg.verify():
        raise ValueError(f"{alg.name}: refusing to save an algorithm that verify() does not prove exact")
    data = {
        "name": alg.name, "format": list(alg.format), "rank": alg.rank, "source": alg.source,
        "U": [[str(x) for x in row] for row in alg.U],
        "V": [[str(x) for x in row] for row in alg.V],
        "W": [[str(x) for x in row] for row in alg.W],
    }
    Path(path).write_text(json.dumps(data, indent=0))


def load_algorithm(path) -> BilinearAlgorithm:
    """Read a JSON file written by :func:`save_algorithm` (exact Fractions)."""
    try:
        d = json.loads(Path(path).read_text())  # a missing file raises FileNotFoundError naming it
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); expected a file written by save_algorithm") from None
    keys = ("format", "U", "V", "W")
    if not isinstance(d, dict) or any(k not in d for k in keys):
        have = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path} is not an algorithm file written by save_algorithm: it needs the keys {list(keys)} "
                         f"(and name, source), has {have}")
    fmt = d["format"]
    if not (isinstance(fmt, list) and len(fmt) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in fmt)):
        raise ValueError(f"{path}: 'format' must be [n, m, p] (three integers), got {fmt!r}")
    n, m, p = fmt

    def arr(label):
        rows = d[label]
        try:
            if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
                raise ValueError("not a list of rows")
            return np.array([[Fraction(x) for x in row] for row in rows], dtype=object)
        except (ValueError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"{path}: '{label}' must be a list of rows of exact fractions such as \"-1/2\" ({e})") from None

    U, V, W = arr("U"), arr("V"), arr("W")
    try:
        return BilinearAlgorithm(n, m, p, U, V, W, name=str(d.get("name", Path(path).stem)),
                                 source=str(d.get("source", f"loaded from {path}")))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- shipped, verified search results
DATA_DIR = Path(__file__).with_name("data")


def shipped_algorithms() -> list[Path]:
    """JSON files of algorithms found by :func:`search` and shipped with the package (each proven by verify())."""
    return sorted(DATA_DIR.glob("*.json")) if DATA_DIR.is_dir() else []


def _register_shipped() -> None:
    """Register every shipped JSON algorithm in the catalogue under its stored name (loaded lazily)."""
    from .catalogue import available, register

    for path in shipped_algorithms():
        name = json.loads(path.read_text())["name"].lower()
        if name not in available():
            register(name)(lambda path=path: load_algorithm(path))


_register_shipped()
