from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from strassenkit.algorithms import BilinearAlgorithm, available, get, matmul_tensor, schoolbook


@pytest.mark.parametrize("name", available())
def test_every_catalogue_entry_verifies_exactly(name):
    alg = get(name)
    assert alg.is_rational
    assert alg.verify(), f"{name} fails the exact tensor identity"
    assert alg.source, "every entry names where it came from"
    assert alg.residual() < 1e-12


def test_required_entries_and_ranks():
    expected = {"strassen": ((2, 2, 2), 7), "winograd": ((2, 2, 2), 7), "laderman": ((3, 3, 3), 23),
                "strassen_x_strassen": ((4, 4, 4), 49)}
    for name, (fmt, rank) in expected.items():
        alg = get(name)
        assert (alg.format, alg.rank) == (fmt, rank)
        assert alg.is_ternary()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_schoolbook_any_size(n, m, p):
    alg = schoolbook(n, m, p)
    assert alg.rank == n * m * p and alg.verify()


def test_kron_of_strassens_is_4x4x4_rank_49():
    alg = get("strassen").kron(get("strassen"))
    assert alg.format == (4, 4, 4) and alg.rank == 49 and alg.verify()
    mixed = get("strassen").kron(schoolbook(1, 2, 3))
    assert mixed.format == (2, 4, 6) and mixed.verify()


@pytest.mark.parametrize("name", ["strassen", "winograd", "laderman", "strassen_2x2x3", "strassen_2x4x4"])
def test_symmetries_preserve_exactness(name):
    alg = get(name)
    n, m, p = alg.format
    t = alg.transpose()
    c = alg.cyclic()
    assert t.format == (p, m, n) and t.verify()
    assert c.format == (m, p, n) and c.verify()
    back = c.cyclic().cyclic()
    assert back.format == alg.format
    for a, b in zip((back.U, back.V, back.W), (alg.U, alg.V, alg.W)):
        assert (a == b).all()


def test_concat_along_each_axis():
    s = get("strassen")
    for axis, fmt in (("n", (4, 2, 2)), ("m", (2, 4, 2)), ("p", (2, 2, 4))):
        alg = s.concat(s, axis)
        assert alg.format == fmt and alg.rank == 14 and alg.verify()
    with pytest.raises(ValueError, match="cannot concatenate"):
        s.concat(get("laderman"), "p")


def test_verify_is_exact_not_float():
    s = get("strassen")
    U = s.U.copy()
    U[0, 0] = U[0, 0] + Fraction(1, 10**30)  # invisible in float64
    bad = BilinearAlgorithm(2, 2, 2, U, s.V, s.W, name="perturbed")
    assert np.allclose(np.asarray(bad.U, dtype=float), np.asarray(s.U, dtype=float))
    assert not bad.verify()
    # a float copy is never "verified", even when numerically exact
    flt = BilinearAlgorithm(2, 2, 2, np.asarray(s.U, float), np.asarray(s.V, float), np.asarray(s.W, float))
    assert not flt.is_rational and not flt.verify() and flt.residual() < 1e-15


def test_wrong_product_fails_verify():
    s = get("strassen")
    W = s.W.copy()
    W[0, 0] = Fraction(0)
    assert not BilinearAlgorithm(2, 2, 2, s.U, s.V, W).verify()


def test_matmul_tensor_definition():
    T = matmul_tensor(2, 3, 4)
    A = np.arange(6).reshape(2, 3)
    B = np.arange(12).reshape(3, 4)
    C = np.einsum("a,b,abc->c", A.ravel(), B.ravel(), T).reshape(2, 4)
    assert (C == A @ B).all()


def test_lookup_forms_and_errors():
    assert get("EXACT:Strassen") is get("strassen")
    assert get("<3,3,3>").rank == 23
    assert get("<5,1,1>").rank == 5  # falls back to schoolbook
    with pytest.raises(KeyError, match="unknown algorithm"):
        get("no-such-algorithm")
    with pytest.raises(KeyError, match="format"):
        get("schoolbook:2,x,3")
    with pytest.raises(ValueError, match="rank"):
        BilinearAlgorithm(2, 2, 2, np.ones((4, 7)), np.ones((4, 6)), np.ones((4, 7)))
    with pytest.raises(ValueError, match="shape"):
        BilinearAlgorithm(2, 2, 2, np.ones((3, 7)), np.ones((4, 7)), np.ones((4, 7)))
    with pytest.raises(ValueError, match="NaN"):
        BilinearAlgorithm(1, 1, 1, np.array([[np.nan]]), np.ones((1, 1)), np.ones((1, 1)))


def _to_cyclic_w(alg):
    n, p = alg.n, alg.p
    W = np.asarray(alg.W, dtype=np.float64)
    return W.reshape(n, p, -1).transpose(1, 0, 2).reshape(p * n, -1)


def test_load_alphatensor_npz_round_trip(tmp_path):
    from strassenkit.algorithms import load_alphatensor_npz

    entries = {}
    for name in ("strassen", "strassen_2x2x3"):
        alg = get(name)
        arr = np.empty(3, dtype=object)
        arr[:] = [np.asarray(alg.U, float), np.asarray(alg.V, float), _to_cyclic_w(alg)]
        entries["{},{},{}".format(*alg.format)] = arr
    path = tmp_path / "factorizations.npz"
    np.savez(path, **entries)
    loaded = load_alphatensor_npz(path)
    assert set(loaded) == {"<2,2,2;7>", "<2,2,3;11>"}
    for alg in loaded.values():
        assert alg.is_rational and alg.verify()
    # the wrong convention is caught by exact verification, with a hint
    with pytest.raises(ValueError, match="try cyclic=True"):
        load_alphatensor_npz(path, cyclic=False)
    bad = tmp_path / "bad.npz"
    np.savez(bad, weights=np.ones(3))
    with pytest.raises(ValueError, match="AlphaTensor's layout"):
        load_alphatensor_npz(bad)
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable npz"):
        load_alphatensor_npz(junk)
