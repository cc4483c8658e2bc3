"""Rank-deficient encoders/decoders: a w_hat-only fit cannot reach the tile directions they miss.

The "als" inits of <4,4,4> at ranks 16-24 often have such factors (e.g. seed 0 at rank 23: D of rank 7 of 16; here Strassen's <2,2,2> with a decoder of rank 2 of 4),
which made uniform rank 23 with alternate=0 calibrate to 0.75 relative error on MiniLM. calibrate_ and plan
must say so, and alternate >= 1 must repair it."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import strassenkit as sk
from strassenkit.algorithms import BilinearAlgorithm, get
from strassenkit.algorithms.families import register_family
from strassenkit.surgery.calibrate import codec_ranks


@register_family("test-short-decoder")
def _short_decoder(n, m, p, rank, seed):
    """Strassen's <2,2,2> (exact, rank 7) with its decoder W projected onto 2 of the 4 output tile directions."""
    alg = get("strassen")
    if (n, m, p, rank) != (2, 2, 2, 7):
        raise ValueError("test-short-decoder is <2,2,2> rank 7 only")
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((4, 2)))[0]
    W = q @ q.T @ np.asarray(alg.W, dtype=np.float64)
    return BilinearAlgorithm(2, 2, 2, np.asarray(alg.U, dtype=np.float64), np.asarray(alg.V, dtype=np.float64), W,
                             name="strassen-short-decoder")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)))


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 16, 32, generator=g) for _ in range(n)]


def _converted(init):
    torch.manual_seed(0)
    dense = Net()
    model = copy.deepcopy(dense)
    sk.strassenify_(model, sk.STLConfig(tile=2, rank=7, init=init))
    return dense, model


def test_codec_ranks_and_the_calibration_warning_with_its_repair():
    dense, model = _converted("test-short-decoder")
    assert codec_ranks(model.a) == (4, 4, 2, 4)
    fixed = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"a \(E_x rank 4/4, D rank 2/4\).*alternate=1"):
        rep0 = sk.calibrate_(model, _data(), reference=dense, progress=False)
    assert (rep0.layers[0].enc_rank, rep0.layers[0].dec_rank) == (4, 2)
    assert rep0.layers[0].rel_err_after > 0.5  # half of every output tile is out of reach
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alternate=1 refits D: nothing to warn about
        rep1 = sk.calibrate_(fixed, _data(), reference=dense, alternate=1, progress=False)
    assert rep1.layers[0].rel_err_after < 0.05  # the exact algorithm is back
    assert codec_ranks(fixed.a)[2] == 4
    # the reference driver reports and warns the same way
    _, again = _converted("test-short-decoder")
    with pytest.warns(UserWarning, match="D rank 2/4"):
        rep = sk.calibrate_(again, _data(), reference=dense, method="data", progress=False)
    assert rep.layers[0].dec_rank == 2


def test_full_rank_init_does_not_warn_and_plan_warns_about_short_candidates():
    dense, model = _converted("strassen")
    assert codec_ranks(model.a) == (4, 4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.calibrate_(model, _data(), reference=dense, progress=False)
    cands = [sk.STLConfig(tile=2, rank=7, init="test-short-decoder")]
    p0 = None
    with pytest.warns(UserWarning, match=r"plan: candidates \['t2r7'\].*alternate="):
        p0 = sk.plan(dense, _data(), budget={"param_ratio": 3.0}, candidates=cands, progress=False)
    assert p0.rows[0].candidates[1]["rel_err"] > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p1 = sk.plan(dense, _data(), budget={"param_ratio": 3.0}, candidates=cands, alternate=1, progress=False)
    assert p1.rows[0].candidates[1]["rel_err"] < 0.05  # measured after D was refitted
