"""sk.plan: per-layer candidates measured on real activations, the budgeted choice checked by brute force."""

import copy
import itertools
import random
import warnings

import pytest
import torch
from torch import nn

import strassenkit as sk
from strassenkit.surgery.planner import solve_budget


def test_solve_budget_is_the_brute_force_optimum():
    rng = random.Random(0)
    for trial in range(30):
        n_items, n_opt = rng.randint(1, 4), rng.randint(1, 4)
        costs = [[rng.uniform(0.1, 3.0) for _ in range(n_opt)] for _ in range(n_items)]
        errs = [[rng.uniform(0, 1) for _ in range(n_opt)] for _ in range(n_items)]
        cap = sum(min(c) for c in costs) + rng.uniform(0, 3)
        best = min((sum(errs[i][j] for i, j in enumerate(ch)), ch) for ch in itertools.product(range(n_opt), repeat=n_items)
                   if sum(costs[i][j] for i, j in enumerate(ch)) <= cap * (1 - 1e-3))  # clear of rounding
        got = solve_budget(errs, costs, cap, bins=20000)
        assert sum(costs[i][j] for i, j in enumerate(got)) <= cap * (1 + 1e-9)
        assert sum(errs[i][j] for i, j in enumerate(got)) <= best[0] + 1e-12
    with pytest.raises(ValueError, match="cannot be met"):
        solve_budget([[0.0, 1.0]], [[5.0, 4.0]], 3.0)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 32)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _setup():
    torch.manual_seed(0)
    model = Toy().double().eval()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 64, dtype=torch.float64)
    batches = [torch.randn(4, 16, 64, generator=g, dtype=torch.float64) @ mix for _ in range(3)]
    cands = [sk.STLConfig(tile=4, rank=r, init="random") for r in (4, 8, 12)]  # 5.3x, 2.7x, 1.8x fewer MACs
    return model, batches, cands


@pytest.mark.parametrize("budget", [{"flop_reduction": 1.5}, {"flop_reduction": 2.2}, {"param_ratio": 0.6}])
def test_plan_is_optimal_over_its_measured_table_and_applies(budget):
    model, batches, cands = _setup()
    p = sk.plan(model, batches, budget, candidates=cands, head=None, progress=False, bins=20000)
    assert [r.name for r in p.rows] == ["a", "b", "c"]
    assert all(r.candidates[0]["label"] == "dense" and r.candidates[0]["rel_err"] == 0 for r in p.rows)
    key = "macs" if "flop_reduction" in budget else "params"
    dense = sum(r.candidates[0][key] for r in p.rows)
    cap = dense / budget["flop_reduction"] if "flop_reduction" in budget else dense * budget["param_ratio"]
    best = None
    for ch in itertools.product(range(len(cands) + 1), repeat=3):
        cost = sum(r.candidates[j][key] for r, j in zip(p.rows, ch))
        if cost <= cap * (1 - 1e-4):
            err = sum(r.candidates[j]["rel_err"] ** 2 for r, j in zip(p.rows, ch))
            best = min(best or (err, ch), (err, ch))
    got = [r.choice for r in p.rows]
    assert sum(r.candidates[j][key] for r, j in zip(p.rows, got)) <= cap * (1 + 1e-9)
    assert p.objective <= best[0] + 1e-12
    # the errors are real: rank 24 fits better than rank 8 on every layer
    for r in p.rows:
        assert r.candidates[3]["rel_err"] < r.candidates[1]["rel_err"] < 1.0
    # applying the plan gives the planned layers and the planned MACs (strassenkit.cost on the same data)
    conv = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.strassenify_(conv, p.config())
    for r in p.rows:
        m = conv.get_submodule(r.name)
        assert isinstance(m, sk.STLinear) == (r.choice != 0)
        if r.choice:
            assert m.rank == cands[r.choice - 1].rank
    macs = sum(sk.cost.count(conv, b).macs for b in batches)
    assert macs == pytest.approx(p.totals["macs"], rel=1e-9)
    assert "total:" in p.table() and p.summary()["choices"]["a"] == p.rows[0].chosen["label"]


def test_known_optimum_weights_keep_the_sensitive_layer_dense():
    """With a huge weight on layer a, the budget is met by converting b and c only: a stays dense, and b and c
    get the most accurate candidates that fit."""
    model, batches, cands = _setup()
    p0 = sk.plan(model, batches, 1.25, candidates=cands, head=None, progress=False)
    p = sk.plan(model, batches, 1.25, candidates=cands, head=None, progress=False, weights={"a": 1e6})
    assert p.rows[0].chosen["label"] == "dense"
    assert p.totals["flop_reduction"] >= 1.25
    # errors of b, c in the weighted plan are the best the remaining budget allows: no cheaper-or-equal
    # pair of candidates with a dense has a smaller error
    cap = p.totals["dense_macs"] / 1.25
    a_dense = p.rows[0].candidates[0]["macs"]
    bc = min(sum(r.candidates[j]["rel_err"] ** 2 for r, j in zip(p.rows[1:], ch))
             for ch in itertools.product(range(4), repeat=2)
             if a_dense + sum(r.candidates[j]["macs"] for r, j in zip(p.rows[1:], ch)) <= cap)
    assert p.objective == pytest.approx(bc, rel=1e-6)
    assert p0.objective <= bc + 1e-12  # the unweighted plan may also convert a, and is never worse


def test_plan_budget_errors_and_time():
    model, batches, cands = _setup()
    with pytest.raises(ValueError, match="cannot be met"):
        sk.plan(model, batches, {"flop_reduction": 50}, candidates=cands, head=None, progress=False)
    with pytest.raises(ValueError, match="measure_time"):
        sk.plan(model, batches, {"time_reduction": 1.1}, candidates=cands, head=None, progress=False)
    with pytest.raises(ValueError, match="budget"):
        sk.plan(model, batches, {"flop_reduction": 2, "params": 3}, candidates=cands, head=None, progress=False)
    p = sk.plan(model, batches, {"time_reduction": 0.5}, candidates=cands[:1], head=None, progress=False,
                measure_time=True)
    assert all(c["seconds"] > 0 for r in p.rows for c in r.candidates)
    assert p.totals["seconds"] <= 2 * p.totals["dense_seconds"] * (1 + 1e-9)
