"""search(): numerical search ending in an exact proof; exact rational decoder; JSON storage of found algorithms."""

from fractions import Fraction

import numpy as np
import pytest

from strassenkit.algorithms import BilinearAlgorithm, available, get, search
from strassenkit.algorithms.approximate import approximate
from strassenkit.algorithms.search import exact_decoder, load_algorithm, save_algorithm, shipped_algorithms


def test_search_rediscovers_strassen_rank_7():
    alg = search(2, 2, 2, 7, seed=0, attempts=10, progress=False)
    assert alg is not None, "no exact <2,2,2;7> in 10 random starts (expected success rate > 40 %)"
    assert alg.format == (2, 2, 2) and alg.rank == 7
    assert alg.is_rational and alg.verify()
    assert alg.meta["attempt"] < 10


def test_search_returns_none_below_the_rank_bound():
    # <2,2,2> has rank 7: rank 6 can never verify, so the search must give up and return None
    assert search(2, 2, 2, 6, seed=0, attempts=2, progress=False, als_sweeps=300, round_sweeps=50) is None


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        search(2, 2, 2, 8)
    with pytest.raises(ValueError, match="attempts"):
        search(2, 2, 2, 7, attempts=0)


def test_exact_decoder_recovers_strassen_and_detects_inconsistency():
    s = get("strassen")
    W = exact_decoder(s.U, s.V, 2, 2, 2)
    assert W is not None
    alg = BilinearAlgorithm(2, 2, 2, s.U, s.V, W)
    assert alg.verify()
    assert all(isinstance(x, Fraction) for x in W.flat)
    assert exact_decoder(s.U[:, :6], s.V[:, :6], 2, 2, 2) is None  # 6 products cannot span <2,2,2>


def test_save_load_roundtrip(tmp_path):
    lad = get("laderman")
    path = tmp_path / "lad.json"
    save_algorithm(lad, path)
    back = load_algorithm(path)
    assert back.verify() and back.format == (3, 3, 3) and back.rank == 23
    assert np.array_equal(back.U, lad.U)
    with pytest.raises(ValueError, match="verify"):
        save_algorithm(approximate("random", 2, 7), tmp_path / "bad.json")


def test_shipped_search_results_verify_exactly_and_are_registered():
    files = shipped_algorithms()
    assert files, "no shipped search results under strassenkit/algorithms/data/"
    for path in files:
        alg = load_algorithm(path)
        assert alg.is_rational and alg.verify(), path.name
        assert alg.name in available()
        assert get(alg.name).verify()
        assert get("<{},{},{}>".format(*alg.format)).rank <= alg.rank
