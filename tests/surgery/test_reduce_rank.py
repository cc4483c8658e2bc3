"""reduce_rank_: start exact (Strassen x Strassen, r=49), drop products by a data-driven criterion, refit."""

import copy
import warnings

import pytest
import torch
from torch import nn

import strassenkit as sk
from strassenkit.surgery.reduce_rank import rank_schedule


def _toy(seed=0):
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 12)).double()
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 16, dtype=torch.float64)
    batches = [torch.randn(8, 12, 16, generator=g, dtype=torch.float64) @ mix for _ in range(4)]
    exact = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.strassenify_(exact, sk.STLConfig(tile=4, rank=49, init="strassen_x_strassen"), head=None)
    return dense, exact, batches


def _rel_out_err(model, dense, batches):
    with torch.no_grad():
        num = sum(float((model(b) - dense(b)).pow(2).sum()) for b in batches)
        den = sum(float(dense(b).pow(2).sum()) for b in batches)
    return (num / den) ** 0.5


def test_schedule():
    assert rank_schedule(49, 24, 5) == [44, 39, 34, 29, 24]
    assert rank_schedule(49, 40) == [43, 40]
    assert rank_schedule(10, 7, 0.25) == [8, 7]
    with pytest.raises(ValueError, match="above"):
        rank_schedule(10, 12)


def test_exact_start_equals_dense_and_target_49_changes_nothing():
    dense, exact, batches = _toy()
    assert _rel_out_err(exact, dense, batches) < 1e-12
    before = copy.deepcopy(exact.state_dict())
    rep = sk.reduce_rank_(exact, batches, 49, reference=dense, progress=False)
    assert all(c.ranks == [49] for c in rep.layers)
    for k, v in exact.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("criterion", ["obs", "energy"])
def test_error_grows_monotonically_and_beats_random_drops(criterion):
    dense, exact, batches = _toy()
    model = copy.deepcopy(exact)
    rep = sk.reduce_rank_(model, batches, 16, reference=dense, step=3, criterion=criterion, ridge=1e-10, progress=False)
    assert all(isinstance(m.rank, int) for m in model.modules() if isinstance(m, sk.STLinear))
    assert [m.rank for m in model.modules() if isinstance(m, sk.STLinear)] == [16, 16]
    for c in rep.layers:
        assert c.ranks[0] == 49 and c.ranks[-1] == 16 and len(c.rel_err) == len(c.ranks)
        assert c.rel_err[0] < 1e-6  # the exact codec refit on data is still exact (up to cancellation)
        assert all(b >= a * (1 - 1e-9) for a, b in zip(c.rel_err, c.rel_err[1:])), c.rel_err  # monotone
        assert sum(len(d) for d in c.dropped) == 49 - 16
    err = _rel_out_err(model, dense, batches)
    rand = []
    for seed in range(3):
        m = copy.deepcopy(exact)
        sk.reduce_rank_(m, batches, 16, reference=dense, step=3, criterion="random", seed=seed, ridge=1e-10,
                        progress=False)
        rand.append(_rel_out_err(m, dense, batches))
    assert err < min(rand), (err, rand)


def test_per_layer_targets_record_and_distill_hook(tmp_path):
    dense, exact, batches = _toy(1)
    calls = []
    rep = sk.reduce_rank_(exact, batches, {"0": 30}, reference=dense, step=10, progress=False,
                          distill=lambda model, rank: calls.append(rank))
    assert exact[0].rank == 30 and exact[2].rank == 49
    assert calls == [39, 30]  # one call per stage
    assert rep.layers[0].ranks == [49, 39, 30]
    from strassenkit.surgery.record import conversion_of

    assert conversion_of(exact)["modules"]["0"]["rank"] == 30
    # keeps the dense original: unload_ gives the dense layer back
    assert exact[0].original is not None


def test_alternating_refit_stays_monotone_and_the_layer_keeps_working():
    dense, exact, batches = _toy(2)
    b = copy.deepcopy(exact)
    rb = sk.reduce_rank_(b, batches, 12, reference=dense, step=8, alternate=2, progress=False)
    for c in rb.layers:
        assert all(y >= x * (1 - 1e-9) for x, y in zip(c.rel_err, c.rel_err[1:])), c.rel_err
    with torch.no_grad():
        y = b(batches[0])
    assert torch.isfinite(y).all() and y.shape == (8, 12, 12)
