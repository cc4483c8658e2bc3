"""Property-based tests (hypothesis) over the public layers and functions.

Shapes (including 0 and sizes that are not tile multiples), dtypes, devices (cpu, meta), memory layout
(transposed, sliced, expanded inputs and parameters) and argument ranges. Every example either matches
its float64 reference (``stl_apply_reference``, ``x @ w``, ``nn.Linear``) or raises a clear error that
names the argument. Examples are few (the suite stays fast) and fixed by the hypothesis seed in CI
(``derandomize``), so a failure reproduces.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import strassenkit as sk
from strassenkit import STLinear
from strassenkit.algorithms import BilinearAlgorithm
from strassenkit.functional import stl_apply, stl_apply_reference, stl_matmul
from strassenkit.train import TrainConfig

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=10)

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _ref(layer: STLinear, x: torch.Tensor) -> torch.Tensor:
    squeeze = x.dim() == 1
    xd = x.double()[None] if squeeze else x.double()
    y = stl_apply_reference(xd, layer.w_hat.double(), layer.enc_x.double(), layer.dec.double(), layer.format,
                            out_features=layer.out_features)
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y[0] if squeeze else y


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout."""
    if how == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "sliced":
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


@st.composite
def stl_setup(draw, dtypes=(torch.float64, torch.float32)):
    tile = draw(st.sampled_from([1, 2, 3, 4]))
    row_tile = draw(st.sampled_from([1, tile]))
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2)))  # 2-D only via two_d below
    L = draw(st.integers(0, 9))
    K, N = draw(st.integers(1, 13)), draw(st.integers(1, 11))
    rank = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    two_d = row_tile == 1 and draw(st.booleans())
    shape = (L, K) if two_d else (*lead, L, K)
    return dict(tile=tile, row_tile=row_tile, shape=shape, K=K, N=N, rank=rank, dtype=dtype, layout=layout,
                bias=bias, seed=seed)


@SETTINGS
@given(stl_setup())
def test_stlinear_matches_float64_reference(s):
    torch.manual_seed(s["seed"])
    layer = STLinear(s["K"], s["N"], bias=s["bias"], tile=s["tile"], rank=s["rank"], row_tile=s["row_tile"],
                     seed=s["seed"], dtype=s["dtype"])
    x = _layout(torch.randn(*s["shape"], dtype=s["dtype"]), s["layout"])
    y = layer(x)
    assert y.shape == (*s["shape"][:-1], s["N"]) and y.dtype == s["dtype"]
    assert _rel(y, _ref(layer, x)) <= TOL[s["dtype"]]


@SETTINGS
@given(stl_setup(dtypes=(torch.float64,)))
def test_stlinear_backward_matches_reference_autograd(s):
    torch.manual_seed(s["seed"])
    layer = STLinear(s["K"], s["N"], bias=s["bias"], tile=s["tile"], rank=s["rank"], row_tile=s["row_tile"],
                     dtype=torch.float64)
    ref = copy.deepcopy(layer)
    x = torch.randn(*s["shape"], dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(*s["shape"][:-1], s["N"], dtype=torch.float64)
    (layer(x) * g).sum().backward()
    (_ref(ref, xr) * g).sum().backward()
    _close_grad = lambda a, b, what: (a is not None and a.shape == b.shape and _rel(a, b) <= 1e-9) or pytest.fail(what)  # noqa: E731
    _close_grad(x.grad, xr.grad, "x")
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{name}: no gradient (nn.Linear gives zeros for an empty batch)"
        _close_grad(p.grad, q.grad, name)


EXACT = ["strassen", "winograd", "laderman", "strassen_x_strassen", "strassen_4x2x2", "strassen_2x2x3"]


@SETTINGS
@given(alg=st.sampled_from(EXACT), lead=st.lists(st.integers(0, 3), min_size=1, max_size=2), L=st.integers(0, 9),
       K=st.integers(1, 14), N=st.integers(1, 14), seed=st.integers(0, 2**16))
def test_exact_from_linear_equals_nn_linear(alg, lead, L, K, N, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N).double()
    a = sk.algorithms.get(alg)
    if a.m != a.p:  # STLinear needs square weight tiles: a clear error
        with pytest.raises(ValueError, match="square weight tiles"):
            STLinear.from_linear(lin, alg)
        return
    layer = STLinear.from_linear(lin, alg)
    x = torch.randn(*lead, L, K, dtype=torch.float64)
    assert _rel(layer(x), lin(x)) <= 1e-11


@SETTINGS
@given(alg=st.sampled_from(EXACT), lead=st.lists(st.integers(0, 2), max_size=2), M=st.integers(0, 9),
       K=st.integers(0, 9), N=st.integers(1, 9), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       seed=st.integers(0, 2**16))
def test_stl_matmul_is_exact_for_any_shape(alg, lead, M, K, N, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(*lead, M, K, generator=g, dtype=torch.float64), layout)
    w = _layout(torch.randn(K, N, generator=g, dtype=torch.float64), layout)
    y = stl_matmul(x, w, alg)
    assert y.shape == (*lead, M, N)
    assert _rel(y, x @ w) <= 1e-11


@SETTINGS
@given(s=stl_setup(dtypes=(torch.float64,)), param_layout=st.sampled_from(["contiguous", "transposed"]))
def test_stl_apply_with_non_contiguous_parameters(s, param_layout):
    torch.manual_seed(s["seed"])
    layer = STLinear(s["K"], s["N"], tile=s["tile"], rank=s["rank"], row_tile=s["row_tile"], dtype=torch.float64)
    x = torch.randn(*s["shape"], dtype=torch.float64)
    if x.dim() < 2:
        return
    ops = [_layout(t.detach(), param_layout) for t in (layer.w_hat, layer.enc_x, layer.dec)]
    y = stl_apply(x, *ops, layer.format, out_features=s["N"])
    ref = stl_apply_reference(x, layer.w_hat, layer.enc_x, layer.dec, layer.format, out_features=s["N"])
    assert _rel(y, ref) <= 1e-10


@SETTINGS
@given(stl_setup())
def test_meta_device_behaves_like_nn_linear(s):
    with torch.device("meta"):
        layer = STLinear(s["K"], s["N"], bias=s["bias"], tile=s["tile"], rank=s["rank"], row_tile=s["row_tile"],
                         dtype=s["dtype"])
        lin = nn.Linear(s["K"], s["N"], bias=s["bias"], dtype=s["dtype"])
    assert all(p.is_meta for p in layer.parameters())
    x = torch.empty(*s["shape"], dtype=s["dtype"], device="meta")
    y = layer(x)
    assert y.is_meta and y.shape == lin(x).shape and y.dtype == s["dtype"]
    with pytest.raises(ValueError, match="meta"):  # a CPU input never meets meta parameters silently
        layer(torch.zeros(*s["shape"], dtype=s["dtype"]))
    src = STLinear(s["K"], s["N"], bias=s["bias"], tile=s["tile"], rank=s["rank"], row_tile=s["row_tile"],
                   dtype=s["dtype"])
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.state_dict())
    xc = torch.randn(*s["shape"], dtype=s["dtype"])
    torch.testing.assert_close(layer(xc), src(xc), rtol=0, atol=0)


ARG_VALUES = st.one_of(st.integers(-2, 9), st.sampled_from([None, 2.5, True, "4"]))


@SETTINGS
@given(in_f=ARG_VALUES, out_f=ARG_VALUES, tile=ARG_VALUES, rank=ARG_VALUES, row_tile=ARG_VALUES)
def test_stlinear_argument_ranges(in_f, out_f, tile, rank, row_tile):
    def valid(v, none_ok=False):
        return (v is None and none_ok) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)

    named = {"in_features": (in_f, False), "out_features": (out_f, False), "tile": (tile, False),
             "rank": (rank, False), "row_tile": (row_tile, True)}
    invalid = [n for n, (v, none_ok) in named.items() if not valid(v, none_ok)]
    if not invalid:
        layer = STLinear(in_f, out_f, tile=tile, rank=rank, row_tile=row_tile)
        x = torch.randn(2, 3, in_f)
        assert layer(x).shape == (2, 3, out_f)
        return
    with pytest.raises(ValueError) as e:
        STLinear(in_f, out_f, tile=tile, rank=rank, row_tile=row_tile)
    assert invalid[0] in str(e.value) and "integer >= 1" in str(e.value)


@FEW
@given(ridge=st.one_of(st.floats(-2, 2), st.sampled_from([math.nan, math.inf, 0.0, 1e-6])),
       alternate=st.integers(-2, 2))
def test_calibrate_argument_ranges(ridge, alternate):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.strassenify_(model, sk.STLConfig(tile=4, rank=12), head=None)
    batches = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    if not (math.isfinite(ridge) and ridge >= 0):
        with pytest.raises(ValueError, match="ridge"):
            sk.calibrate_(model, batches, reference=dense, ridge=ridge, alternate=max(alternate, 0), progress=False)
        return
    if alternate < 0:
        with pytest.raises(ValueError, match="alternate"):
            sk.calibrate_(model, batches, reference=dense, ridge=ridge, alternate=alternate, progress=False)
        return
    rep = sk.calibrate_(model, batches, reference=dense, ridge=ridge, alternate=alternate, progress=False)
    assert len(rep.layers) == 2
    for c in rep.layers:
        assert math.isfinite(c.rel_err_after)
        if ridge <= 0.01:  # (nearly) plain least squares never makes the fit worse on its own data
            assert c.rel_err_after <= c.rel_err_before * (1 + 1e-9), c


@SETTINGS
@given(rows=st.integers(0, 6), rank=st.integers(0, 6), kind=st.sampled_from(["int", "float", "str", "complex",
                                                                            "bool", "none", "nan"]))
def test_bilinear_algorithm_factor_checks(rows, rank, kind):
    """Any factor array either builds an algorithm or raises a clear error naming the factor."""
    make = {"int": lambda s: np.ones(s, dtype=int), "float": lambda s: np.full(s, 0.5),
            "str": lambda s: np.full(s, "1"), "complex": lambda s: np.ones(s) * 1j,
            "bool": lambda s: np.ones(s, dtype=bool), "none": lambda s: np.full(s, None),
            "nan": lambda s: np.full(s, np.nan)}[kind]
    U = make((rows, rank))
    V, W = np.ones((4, rank), dtype=int), np.ones((4, rank), dtype=int)
    good_shape = rows == 4 and rank >= 1
    good_kind = kind in ("int", "float")
    if good_shape and good_kind:
        alg = BilinearAlgorithm(2, 2, 2, U, V, W)
        assert alg.rank == rank and alg.is_rational == (kind == "int")
        return
    with pytest.raises((ValueError, TypeError)) as e:
        BilinearAlgorithm(2, 2, 2, U, V, W)
    msg = str(e.value)
    assert "U" in msg and ("shape" in msg or "rank" in msg or "numbers" in msg or "NaN" in msg or "Fraction" in msg)


@SETTINGS
@given(steps=st.integers(-2, 5), batch_size=st.integers(-1, 4), lr=st.sampled_from([-1.0, 0.0, 1e-3, math.nan]),
       warmup=st.integers(-1, 3), min_lr=st.sampled_from([-0.5, 0.0, 0.5, 1.0, 1.5]))
def test_trainconfig_argument_ranges(steps, batch_size, lr, warmup, min_lr):
    kw = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, min_lr_ratio=min_lr)
    bad = [name for name, ok in (("steps", steps >= 0), ("batch_size", batch_size >= 1), ("lr", lr > 0),
                                 ("warmup_steps", warmup >= 0), ("min_lr_ratio", 0 <= min_lr <= 1)) if not ok]
    if not bad:
        cfg = TrainConfig(**kw)
        assert cfg.steps == steps
        return
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw)
    assert any(name in str(e.value) for name in bad), (bad, str(e.value))


@SETTINGS
@given(K=st.integers(1, 12), N=st.integers(1, 12), rank=st.integers(1, 12), lead=st.lists(st.integers(0, 3), max_size=2),
       phase=st.sampled_from(["full", "ternary"]), seed=st.integers(0, 2**16))
def test_spnlinear_to_dense_is_the_same_map(K, N, rank, lead, phase, seed):
    torch.manual_seed(seed)
    layer = sk.SPNLinear(K, N, rank=rank).double()
    layer.set_phase(phase)
    x = torch.randn(*lead, K, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, N)
    assert _rel(layer.to_dense()(x), y) <= 1e-10


@FEW
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 4), k=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 1), hw=st.integers(3, 7), batch=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_spnconv2d_shape_is_conv2d_shape_and_to_dense_matches(c_in, c_out, k, stride, padding, hw, batch, seed):
    torch.manual_seed(seed)
    layer = sk.SPNConv2d(c_in, c_out, k, stride=stride, padding=padding, rank=max(1, c_out)).double()
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding).double()
    x = torch.randn(batch, c_in, hw, hw, dtype=torch.float64)
    y = layer(x)
    assert y.shape == conv(x).shape
    assert _rel(layer.to_dense()(x), y) <= 1e-9


def test_four_python_threads_give_bit_identical_results():
    """Concurrent forward + backward from 4 Python threads equals the serial run bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    layer = STLinear(64, 48, tile=4, rank=24)
    xs = [torch.randn(3, 37, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def step(x):
        w = [p.detach().clone().requires_grad_(True) for p in (layer.w_hat, layer.enc_x, layer.dec)]
        y = stl_apply(x, *w, layer.format, out_features=48)
        y.pow(2).sum().backward()
        return [y.detach()] + [p.grad for p in w]

    serial = [step(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(step, xs))
    for a, b in zip(serial, threaded):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
