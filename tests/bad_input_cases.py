"""The bad-input and fault table of issue #13: one row per case, each with the verdict it must get.

A case is a function plus what it must do:

- ``error=None``: it must run without an exception (its own asserts compare against float64 references,
  ``nn.Linear`` semantics or the documented behaviour; ``warns=...`` words must appear in a warning).
- ``error=ExcType``: it must raise that type, and the message must contain every word of ``arg`` (the
  argument or file at fault) and of ``fix`` (what to do about it), case-insensitively.

:func:`verdict` sorts the outcome of running one case into

    correct        ran, and the result checks out (ok cases)
    clear error    raised the expected type, naming the argument and the fix (error cases)
    vague          raised the expected type, but the message lacks the argument or the fix
    silent-wrong   returned a wrong result, accepted a bad input, or left out a promised warning
    crash          raised something else (an internal error, a traceback where none was expected)

``tests/test_bad_inputs.py`` runs every row under pytest; ``python tests/bad_inputs_report.py`` counts
the rows by verdict (the closing note of the issue quotes that count).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import strassenkit as sk
from strassenkit import STLConfig, STLinear
from strassenkit.algorithms import BilinearAlgorithm, approximate, get, load_alphatensor_npz
from strassenkit.algorithms.search import load_algorithm, save_algorithm
from strassenkit.functional import stl_apply, stl_apply_reference, stl_encode_weight, stl_matmul
from strassenkit.surgery import calibrate_, config_from_dict, densify_, inspect_targets, strassenify_
from strassenkit.train import (CorruptCheckpointError, NonFiniteLossError, TrainConfig, latest_checkpoint,
                               load_checkpoint, save_checkpoint, train)

VERDICTS = ("correct", "clear error", "vague", "silent-wrong", "crash")


@dataclass
class Case:
    id: str
    run: Callable[[], object]
    error: type | tuple | None = None
    arg: tuple = ()
    fix: tuple = ()
    warns: tuple = ()
    note: str = ""

    @property
    def expected(self) -> str:
        return "correct" if self.error is None else "clear error"


CASES: list[Case] = []


def _t(v) -> tuple:
    return (v,) if isinstance(v, str) else tuple(v)


def ok(id, fn=None, warns=(), note=""):
    """Register a case that must run correctly (used as ``ok(id, fn)`` or as a decorator ``@ok(id)``)."""
    def deco(f):
        CASES.append(Case(id, f, None, warns=_t(warns), note=note))
        return f
    return deco(fn) if fn is not None else deco


def bad(id, fn=None, error=ValueError, arg=(), fix=(), note=""):
    """Register a case that must raise ``error`` naming ``arg`` and ``fix`` (call or decorator)."""
    def deco(f):
        CASES.append(Case(id, f, error, _t(arg), _t(fix), note=note))
        return f
    return deco(fn) if fn is not None else deco


def verdict(case: Case) -> tuple[str, str]:
    """(verdict, detail) of running ``case`` once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run()
        except AssertionError as e:
            return ("silent-wrong", f"wrong result: {e}") if case.error is None else ("crash", f"AssertionError: {e}")
        except Exception as e:  # noqa: BLE001 - sorting every outcome is the point
            msg = f"{type(e).__name__}: {e}"
            if case.error is None or not isinstance(e, case.error):
                return "crash", msg
            low = str(e).lower()
            missing = [w for w in (*case.arg, *case.fix)  # "^word": the message starts with it
                       if (not low.startswith(w[1:].lower()) if w.startswith("^") else w.lower() not in low)]
            return ("vague", f"message lacks {missing}: {msg}") if missing else ("clear error", msg)
    if case.error is not None:
        return "silent-wrong", f"no {getattr(case.error, '__name__', case.error)} raised: the bad input was accepted"
    texts = [str(w.message).lower() for w in caught]
    if case.warns and not any(all(word.lower() in t for word in case.warns) for t in texts):
        return "silent-wrong", f"no warning with {list(case.warns)} (got {texts[:3]})"
    return "correct", ""


# =============================================================================== helpers
def _close(a, b, tol=1e-10, what="result"):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    den = float(b.norm()) or 1.0
    err = float((a - b).norm()) / den
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _ref(layer: STLinear, x: torch.Tensor) -> torch.Tensor:
    """The float64 einsum reference of an STLinear's forward."""
    xd = x.double()
    squeeze = xd.dim() == 1
    if squeeze:
        xd = xd[None]
    y = stl_apply_reference(xd, layer.w_hat.double(), layer.enc_x.double(), layer.dec.double(), layer.format,
                            out_features=layer.out_features)
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y[0] if squeeze else y


def _layer(**kw):
    torch.manual_seed(0)
    return STLinear(16, 8, **kw).double()


def _exact_pair(k=16, n=8):
    torch.manual_seed(0)
    lin = nn.Linear(k, n).double()
    return lin, STLinear.from_linear(lin, "strassen_x_strassen")


class Mlp(nn.Module):
    def __init__(self, d=16, h=32, out=4):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, out)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _converted(**cfg):
    torch.manual_seed(0)
    dense = Mlp()
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strassenify_(model, STLConfig(**cfg) if cfg else STLConfig())
    return dense, model


def _batches(n=3, shape=(4, 8, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@contextlib.contextmanager
def _tmpdir():
    d = tempfile.mkdtemp(prefix="sk-bad-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# =============================================================================== STLinear: constructor
for _name, _kw in [("in_features", dict(in_features=0)), ("in_features", dict(in_features=-3)),
                   ("in_features", dict(in_features=2.5)), ("in_features", dict(in_features=True)),
                   ("in_features", dict(in_features="16")), ("out_features", dict(out_features=0)),
                   ("tile", dict(tile=0)), ("tile", dict(tile=2.0)), ("rank", dict(rank=0)),
                   ("rank", dict(rank=-1)), ("row_tile", dict(row_tile=0)), ("row_tile", dict(row_tile=1.5)),
                   ("seed", dict(seed=-1)), ("seed", dict(seed="a"))]:
    def _mk(kw=_kw):
        args = {"in_features": 16, "out_features": 8, **kw}
        STLinear(args.pop("in_features"), args.pop("out_features"), **args)
    bad(f"STLinear({_name}={list(_kw.values())[0]!r})", _mk, ValueError, arg=_name, fix="integer >=")

bad("STLinear(init='bogus')", lambda: STLinear(16, 8, init="bogus"), ValueError, arg="init", fix=("family", "catalogue"))
bad("STLinear(init=5)", lambda: STLinear(16, 8, init=5), TypeError, arg="init", fix="string")
bad("STLinear(init exact, wrong rank)", lambda: STLinear(16, 8, init="strassen_x_strassen", rank=24), ValueError,
    arg="rank", fix="rank=49")
bad("STLinear(init exact, wrong tile)", lambda: STLinear(16, 8, tile=2, rank=49, init="strassen_x_strassen"),
    ValueError, arg="<2,2,2>", fix="change tile")
bad("STLinear(dtype=torch.int64)", lambda: STLinear(16, 8, dtype=torch.int64), TypeError, arg="dtype",
    fix="floating-point")


@ok("STLinear(device='meta') builds without values, like nn.Linear")
def _():
    layer = STLinear(16, 8, device="meta")
    assert all(p.is_meta for p in layer.parameters()) and layer.enc_w.is_meta
    assert layer.w_hat.shape == (24, 4, 2)


@ok("with torch.device('meta'): STLinear(16, 8)")
def _():
    with torch.device("meta"):
        layer = STLinear(16, 8, init="als", rank=24)
    assert all(p.is_meta for p in layer.parameters())


@ok("meta STLinear -> to_empty -> load_state_dict equals the source layer")
def _():
    src = _layer()
    with torch.device("meta"):
        layer = STLinear(16, 8, dtype=torch.float64)
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.state_dict())
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    _close(layer(x), _ref(src, x))


@ok("meta STLinear forward on a meta input gives the right meta shape")
def _():
    layer = STLinear(16, 8, device="meta")
    y = layer(torch.empty(3, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (3, 5, 8) and y.dtype == torch.float32


@ok("from_linear of a meta nn.Linear stays on meta (big-model conversion)")
def _():
    with torch.device("meta"):
        lin = nn.Linear(16, 8)
    layer = STLinear.from_linear(lin, "strassen_x_strassen")
    assert layer.w_hat.is_meta and layer.bias.is_meta


bad("from_linear(nn.Conv2d)", lambda: STLinear.from_linear(nn.Conv2d(3, 3, 1)), TypeError, arg="from_linear",
    fix="nn.Linear")
bad("from_linear(init='random') without tile/rank", lambda: STLinear.from_linear(nn.Linear(8, 8), "random"),
    ValueError, arg="init='random'", fix=("tile=", "rank="))


def _nan_linear():
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    STLinear.from_linear(lin)


bad("from_linear of a layer with NaN weights", _nan_linear, ValueError, arg="NaN", fix="cannot convert")
bad("load_dense_weight wrong shape", lambda: STLinear(8, 8).load_dense_weight(torch.randn(8, 9)), ValueError,
    arg="weight", fix="(out_features=8, in_features=8)")
bad("to_dense with row_tile=4", lambda: STLinear(8, 8).to_dense(), ValueError, arg="row_tile=4", fix="row_tile=1")

# =============================================================================== STLinear: forward
bad("STLinear forward wrong feature size", lambda: _layer()(torch.randn(2, 4, 12, dtype=torch.float64)), ValueError,
    arg="(..., 16)", fix="(2, 4, 12)")
bad("STLinear forward 2-D input with row_tile=4", lambda: _layer()(torch.randn(5, 16, dtype=torch.float64)),
    ValueError, arg="row_tile=4", fix="row_tile=1")
bad("STLinear forward 1-D input with row_tile=4", lambda: _layer()(torch.randn(16, dtype=torch.float64)),
    ValueError, arg="row_tile=4", fix="row_tile=1")
bad("STLinear forward 0-d input", lambda: _layer(row_tile=1)(torch.tensor(1.0, dtype=torch.float64)), ValueError,
    arg="input", fix="(..., 16)")
bad("STLinear forward on a list", lambda: _layer()([[1.0] * 16]), TypeError, arg="torch.Tensor", fix="(..., 16)")
bad("STLinear forward integer input", lambda: _layer()(torch.ones(2, 4, 16, dtype=torch.long)), TypeError,
    arg="x", fix=".float()")
bad("STLinear forward complex input", lambda: _layer()(torch.ones(2, 4, 16, dtype=torch.complex64)), TypeError,
    arg="x", fix=".float()")


@ok("STLinear forward 2-D input with row_tile=1 matches the float64 reference")
def _():
    layer = _layer(row_tile=1)
    x = torch.randn(7, 16, dtype=torch.float64)
    _close(layer(x), _ref(layer, x))


@ok("STLinear forward 1-D input with row_tile=1 matches the float64 reference")
def _():
    layer = _layer(row_tile=1)
    x = torch.randn(16, dtype=torch.float64)
    _close(layer(x), _ref(layer, x))


@ok("STLinear forward (2, 0, 16): empty output like nn.Linear")
def _():
    y = _layer()(torch.randn(2, 0, 16, dtype=torch.float64))
    assert y.shape == (2, 0, 8)


@ok("STLinear forward (0, 16) with row_tile=1")
def _():
    y = _layer(row_tile=1)(torch.randn(0, 16, dtype=torch.float64))
    assert y.shape == (0, 8)


@ok("STLinear forward (0, 4, 16)")
def _():
    assert _layer()(torch.randn(0, 4, 16, dtype=torch.float64)).shape == (0, 4, 8)


@ok("STLinear backward on an empty batch: zero gradients of every parameter's shape, like nn.Linear")
def _():
    layer = _layer()
    x = torch.randn(0, 4, 16, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    lin = nn.Linear(16, 8).double()
    lin(x.detach()).sum().backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) == 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert p.grad.shape == p.shape and float(p.grad.abs().sum()) == 0, name
    assert x.grad is not None and x.grad.shape == x.shape


@ok("STLinear backward with L=0 rows")
def _():
    layer = _layer()
    x = torch.randn(3, 0, 16, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


@ok("STLinear forward on a non-contiguous (transposed) input")
def _():
    layer = _layer()
    x = torch.randn(2, 16, 7, dtype=torch.float64).transpose(1, 2)
    assert not x.is_contiguous()
    _close(layer(x), _ref(layer, x))


@ok("STLinear forward on an expanded (stride-0) input")
def _():
    layer = _layer()
    x = torch.randn(1, 5, 16, dtype=torch.float64).expand(3, 5, 16)
    _close(layer(x), _ref(layer, x))


@ok("STLinear float32 layer on a float64 input computes in float64 (x's dtype, as documented)")
def _():
    torch.manual_seed(0)
    layer = STLinear(16, 8)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    _close(y, _ref(layer, x), tol=1e-12)


@ok("STLinear bfloat16 input: bf16 output close to the float64 reference")
def _():
    layer = _layer().float()
    x = torch.randn(2, 8, 16)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    _close(y, _ref(layer, x.bfloat16()), tol=3e-2)


@ok("STLinear exact init: NaN in one row spreads to its row tile only (documented)")
def _():
    lin, layer = _exact_pair()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    x[0, 5, 3] = float("nan")
    y, ref = layer(x), lin(x)
    bad_rows = torch.isnan(y).any(-1)
    expect = torch.zeros(2, 9, dtype=torch.bool)
    expect[0, 4:8] = True  # the 4-row tile of row 5
    assert torch.equal(bad_rows, expect), bad_rows
    _close(y[~expect], ref[~expect], tol=1e-12, what="rows outside the tile")
    assert "NaN" in (STLinear.__doc__ or "") and "row tile" in (STLinear.__doc__ or "")


@ok("STLinear row_tile=1: NaN stays in its row")
def _():
    layer = _layer(row_tile=1)
    x = torch.randn(9, 16, dtype=torch.float64)
    x[5, 0] = float("inf")
    y = layer(x)
    assert torch.equal(~torch.isfinite(y).all(-1), torch.arange(9) == 5)


def _meta_dec():
    layer = STLinear(16, 8)
    layer.dec = nn.Parameter(torch.empty(16, 24, device="meta"))
    layer(torch.randn(2, 4, 16))


bad("STLinear with its decoder left on meta (issue: returned 5e5 garbage)", _meta_dec, ValueError,
    arg=("dec", "meta"), fix="to_empty")


def _assign_missing():
    src = STLinear(16, 8)
    with torch.device("meta"):
        layer = STLinear(16, 8)
    sd = src.state_dict()
    del sd["w_hat"]
    layer.load_state_dict(sd, assign=True, strict=False)
    layer(torch.randn(2, 4, 16))


bad("load_state_dict(assign=True, strict=False) with a missing key, then forward", _assign_missing, ValueError,
    arg=("w_hat", "meta"), fix="load")


def _meta_input():
    STLinear(16, 8)(torch.empty(2, 4, 16, device="meta"))


bad("CPU STLinear on a meta input", _meta_input, ValueError, arg=("cpu", "meta"), fix=".to(")
bad("stl_apply with w_hat on meta and x on cpu",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.empty(24, 4, 2, device="meta"), torch.randn(24, 16),
                      torch.randn(16, 24), 4), ValueError, arg=("w_hat", "meta"), fix="to_empty")

# =============================================================================== functional
_sxs = get("strassen_x_strassen")
bad("stl_matmul shape mismatch", lambda: stl_matmul(torch.randn(3, 5, 6), torch.randn(7, 4), "strassen"),
    ValueError, arg="shape mismatch", fix="x.shape[-1] must equal w.shape[0]")
bad("stl_matmul 1-D weight", lambda: stl_matmul(torch.randn(3, 5, 6), torch.randn(6), "strassen"), ValueError,
    arg="w", fix="2-D")
bad("stl_matmul unknown algorithm", lambda: stl_matmul(torch.randn(3, 4, 4), torch.randn(4, 4), "nope"), KeyError,
    arg="nope", fix="choose one of")
bad("stl_matmul algorithm of wrong type", lambda: stl_matmul(torch.randn(3, 4, 4), torch.randn(4, 4), 3), TypeError,
    arg="algorithm", fix="catalogue name")
bad("stl_matmul integer x", lambda: stl_matmul(torch.ones(3, 4, 4, dtype=torch.int32), torch.randn(4, 4), "strassen"),
    TypeError, arg="x", fix=".float()")
bad("stl_apply enc_x of the wrong shape",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.randn(24, 4, 2), torch.randn(24, 15), torch.randn(16, 24), 4),
    ValueError, arg="enc_x", fix="(rank, 16)")
bad("stl_apply dec of the wrong shape",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.randn(24, 4, 2), torch.randn(24, 16), torch.randn(16, 23), 4),
    ValueError, arg="dec", fix="(16, 24)")
bad("stl_apply w_hat of the wrong shape",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.randn(24, 3, 2), torch.randn(24, 16), torch.randn(16, 24), 4),
    ValueError, arg="w_hat", fix="ceil(K/4)=4")
bad("stl_apply out_features out of range",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.randn(24, 4, 2), torch.randn(24, 16), torch.randn(16, 24), 4,
                      out_features=9), ValueError, arg="out_features", fix="(4, 8]")
bad("stl_apply tile=0",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.randn(24, 4, 2), torch.randn(24, 16), torch.randn(16, 24), 0),
    ValueError, arg="tile", fix=">= 1")
bad("stl_apply tile='a'",
    lambda: stl_apply(torch.randn(2, 4, 16), torch.randn(24, 4, 2), torch.randn(24, 16), torch.randn(16, 24), "a"),
    ValueError, arg="tile", fix="tuple (n, m, p)")
bad("stl_apply 1-D x",
    lambda: stl_apply(torch.randn(16), torch.randn(24, 4, 2), torch.randn(24, 16), torch.randn(16, 24), 4),
    ValueError, arg="x", fix="(..., M, K)")
bad("stl_encode_weight 1-D weight", lambda: stl_encode_weight(torch.randn(16), torch.randn(24, 16), 4), ValueError,
    arg="w", fix="2-D (K, N)")


@ok("stl_matmul with K=0 gives zeros, like x @ w")
def _():
    y = stl_matmul(torch.randn(2, 5, 0, dtype=torch.float64), torch.randn(0, 6, dtype=torch.float64), "strassen")
    assert y.shape == (2, 5, 6) and not y.any()


@ok("stl_matmul with M=0")
def _():
    assert stl_matmul(torch.randn(2, 0, 6, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64),
                      "strassen").shape == (2, 0, 5)


@ok("stl_matmul odd sizes equal x @ w in float64 (exact algorithm)")
def _():
    x, w = torch.randn(3, 13, 11, dtype=torch.float64), torch.randn(11, 7, dtype=torch.float64)
    _close(stl_matmul(x, w, "strassen_x_strassen"), x @ w, tol=1e-12)

# =============================================================================== algorithms
_s = get("strassen")
bad("BilinearAlgorithm with string entries", lambda: BilinearAlgorithm(2, 2, 2, _s.U.astype(str), _s.V, _s.W),
    TypeError, arg=("U", "strings"), fix="Fraction")
bad("BilinearAlgorithm with an object array of words",
    lambda: BilinearAlgorithm(2, 2, 2, np.array([["a"] * 7] * 4, dtype=object), _s.V, _s.W), TypeError,
    arg="U[0, 0]", fix="fractions.Fraction")
bad("BilinearAlgorithm with None entries", lambda: BilinearAlgorithm(2, 2, 2, np.full((4, 7), None), _s.V, _s.W),
    TypeError, arg="U[0, 0]", fix="fractions.Fraction")
bad("BilinearAlgorithm with complex entries", lambda: BilinearAlgorithm(2, 2, 2, np.ones((4, 7)) * 1j, _s.V, _s.W),
    TypeError, arg=("U", "complex"), fix="real numbers")
bad("BilinearAlgorithm with NaN entries", lambda: BilinearAlgorithm(2, 2, 2, np.full((4, 7), np.nan), _s.V, _s.W),
    ValueError, arg="U", fix="NaN")
bad("BilinearAlgorithm U of the wrong shape", lambda: BilinearAlgorithm(2, 2, 2, np.ones((3, 7)), _s.V, _s.W),
    ValueError, arg="U", fix="(4, rank)")
bad("BilinearAlgorithm ranks differ", lambda: BilinearAlgorithm(2, 2, 2, _s.U[:, :6], _s.V, _s.W), ValueError,
    arg="U, V, W", fix="same rank")
bad("BilinearAlgorithm(n=True)", lambda: BilinearAlgorithm(True, 2, 2, _s.U, _s.V, _s.W), ValueError, arg="n",
    fix="positive integer")
bad("BilinearAlgorithm(n=2.0)", lambda: BilinearAlgorithm(2.0, 2, 2, _s.U, _s.V, _s.W), ValueError, arg="n",
    fix="positive integer")
bad("algorithms.get unknown name", lambda: get("nope"), KeyError, arg="nope", fix="choose one of")
bad("algorithms.get('schoolbook:0,1,1')", lambda: get("schoolbook:0,1,1"), KeyError, arg="schoolbook:0,1,1",
    fix=">= 1")
bad("approximate unknown family", lambda: approximate("bogus"), ValueError, arg="bogus", fix="choose one of")
bad("approximate(rank=0)", lambda: approximate("als", rank=0), ValueError, arg="rank", fix="integer >= 1")
bad("approximate(tile=0)", lambda: approximate("random", tile=0), ValueError, arg="^tile", fix="integer >= 1")


def _npz(content):
    d = tempfile.mkdtemp(prefix="sk-npz-")
    path = os.path.join(d, "f.npz")
    np.savez(path, **content)
    try:
        load_alphatensor_npz(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


_U, _V, _W = (np.array(f, dtype=float) for f in (_s.U, _s.V, _s.W))
bad("AlphaTensor npz with a wrongly shaped W", lambda: _npz({"2,2,2": np.array([_U, _V, _W[:3]], dtype=object)}),
    ValueError, arg=("'2,2,2'", "W", "(3, 7)"), fix="(n*p=4, R)")
bad("AlphaTensor npz with a wrongly shaped U", lambda: _npz({"2,2,2": np.array([_U[:3], _V, _W], dtype=object)}),
    ValueError, arg=("U", "(3, 7)"), fix="(n*m=4, R)")
bad("AlphaTensor npz with 3-D factors", lambda: _npz({"2,2,2": np.ones((3, 4, 7, 2))}), ValueError,
    arg=("U", "(4, 7, 2)"), fix="(n*m=4, R)")
bad("AlphaTensor npz with two factors", lambda: _npz({"2,2,2": np.stack([_U, _V])}), ValueError, arg="'2,2,2'",
    fix="(U, V, W)")
bad("AlphaTensor npz with a bad key", lambda: _npz({"two": np.array([_U, _V, _W], dtype=object)}), ValueError,
    arg="'two'", fix="'n,m,p'")


def _not_npz():
    with _tmpdir() as d:
        path = os.path.join(d, "x.npz")
        open(path, "w").write("hello")
        load_alphatensor_npz(path)


bad("AlphaTensor loader on a text file", _not_npz, ValueError, arg="x.npz", fix="npz")


@ok("AlphaTensor npz in the right layout loads and verifies")
def _():
    with _tmpdir() as d:
        path = os.path.join(d, "s.npz")
        Wc = _W.reshape(2, 2, 7).transpose(1, 0, 2).reshape(4, 7)  # to AlphaTensor's cyclic convention
        np.savez(path, **{"2,2,2": np.array([_U, _V, Wc], dtype=object)})
        algs = load_alphatensor_npz(path)
        assert list(algs) == ["<2,2,2;7>"] and algs["<2,2,2;7>"].verify()


def _json_alg(text):
    with _tmpdir() as d:
        path = os.path.join(d, "alg.json")
        open(path, "w").write(text)
        load_algorithm(path)


bad("load_algorithm on foreign JSON", lambda: _json_alg('{"a": 1}'), ValueError, arg="alg.json",
    fix="save_algorithm")
bad("load_algorithm on a JSON list", lambda: _json_alg("[1, 2]"), ValueError, arg="alg.json", fix="save_algorithm")
bad("load_algorithm on non-JSON", lambda: _json_alg("not json"), ValueError, arg="alg.json", fix="save_algorithm")
bad("load_algorithm with a 2-entry format",
    lambda: _json_alg('{"format": [2, 2], "U": [], "V": [], "W": [], "name": "x", "source": ""}'), ValueError,
    arg="format", fix="[n, m, p]")
bad("load_algorithm with words as factors",
    lambda: _json_alg('{"format": [2, 2, 2], "U": [["x"]], "V": [], "W": []}'), ValueError, arg="'U'",
    fix="exact fractions")
bad("load_algorithm with wrongly shaped factors",
    lambda: _json_alg('{"format": [2, 2, 2], "U": [["1"]], "V": [["1"]], "W": [["1"]]}'), ValueError,
    arg=("alg.json", "U"), fix="(4, rank)")
bad("load_algorithm on a missing file", lambda: load_algorithm("/nonexistent/alg.json"), FileNotFoundError,
    arg="/nonexistent/alg.json", fix="No such file")


@ok("save_algorithm -> load_algorithm round trip is exact")
def _():
    with _tmpdir() as d:
        path = os.path.join(d, "s.json")
        save_algorithm(_s, path)
        back = load_algorithm(path)
        assert back.verify() and back.format == (2, 2, 2) and back.rank == 7

# =============================================================================== surgery: strassenify_ / inspect
bad("strassenify_ on a non-module", lambda: strassenify_("model", STLConfig()), TypeError, arg="model",
    fix="nn.Module")
bad("strassenify_ without a config", lambda: strassenify_(Mlp()), ValueError, arg="config", fix="STLConfig")
bad("strassenify_ with a config of the wrong type", lambda: strassenify_(Mlp(), 3), TypeError, arg="config",
    fix="STLConfig")
bad("strassenify_ with an invalid regex target", lambda: strassenify_(Mlp(), STLConfig(), targets="re:fc(["),
    ValueError, arg="re:fc([", fix="regex")
bad("strassenify_(causal=True) with row_tile=4", lambda: strassenify_(Mlp(), STLConfig(row_tile=4), causal=True),
    ValueError, arg="row_tile=4", fix="row_tile=1")
bad("STLConfig(tile=0)", lambda: STLConfig(tile=0), ValueError, arg="tile", fix="integer >= 1")
bad("STLConfig(rank=-1)", lambda: STLConfig(rank=-1), ValueError, arg="rank", fix="integer >= 1")
bad("STLConfig(init=5)", lambda: STLConfig(init=5), TypeError, arg="init", fix="string")
bad("STLConfig(version=2)", lambda: STLConfig(version=2), ValueError, arg="version 2", fix="version 1")
bad("SPNConfig(rank and rank_ratio)", lambda: sk.SPNConfig(rank=2, rank_ratio=0.5), ValueError,
    arg=("rank=", "rank_ratio="), fix="at most one")
bad("SPNConfig(quantizer='x')", lambda: sk.SPNConfig(quantizer="x"), ValueError, arg="quantizer", fix="'twn'")
bad("config_from_dict without a type", lambda: config_from_dict({"tile": 4}), ValueError, arg="'type'",
    fix="STLConfig")
bad("config_from_dict unknown type", lambda: config_from_dict({"type": "Foo"}), ValueError, arg="Foo", fix="known")
bad("config_from_dict unknown field", lambda: config_from_dict({"type": "STLConfig", "tiles": 4}), ValueError,
    arg="tiles", fix="fields are")
bad("densify_(strict=True) with row_tile=4 layers", lambda: densify_(_converted()[1], strict=True), ValueError,
    arg="row_tile > 1", fix="not changed")


@ok("strassenify_ targets matching nothing warns and leaves the model unchanged", warns=("matched no",))
def _():
    m = Mlp()
    before = copy.deepcopy(m.state_dict())
    assert strassenify_(m, STLConfig(), targets="nothing_here") == []
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@ok("strassenify_: a module registered twice is converted once and stays shared (issue: b stayed dense)")
def _():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = self.a
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.b(self.a(x)))

    torch.manual_seed(0)
    m = Shared().double()
    ref = copy.deepcopy(m)
    names = strassenify_(m, STLConfig(init="strassen_x_strassen", rank=None))
    assert set(names) == {"a", "b"}, names
    assert isinstance(m.a, STLinear) and m.a is m.b
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    _close(m(x), ref(x), tol=1e-12)


@ok("strassenify_: Linears that share one weight are skipped with a warning saying why", warns=("shares a weight",))
def _():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.out(self.b(self.a(x)))

    m = Tied()
    strassenify_(m, STLConfig(), head=None)
    assert type(m.a) is nn.Linear and type(m.b) is nn.Linear and m.a.weight is m.b.weight
    assert isinstance(m.out, STLinear)


def _encoder(nested=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested) if nested else layer
    enc = enc.double()
    ref = copy.deepcopy(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MultiheadAttention.out_proj is skipped with a warning
        strassenify_(enc, STLConfig(init="strassen_x_strassen", rank=None), head=None)
    return enc.eval(), ref.eval()


@ok("converted nn.TransformerEncoderLayer runs in eval() and matches the dense layer (issue: crashed)")
def _():
    enc, ref = _encoder()
    assert isinstance(enc.linear1, STLinear)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        _close(enc(x), ref(x), tol=1e-10)


@ok("converted nn.TransformerEncoder (nested-tensor path) with a padding mask in eval()")
def _():
    enc, ref = _encoder(nested=True)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 5:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, r = enc(x, src_key_padding_mask=mask), ref(x, src_key_padding_mask=mask)
    _close(y[~mask], r[~mask], tol=1e-10, what="real tokens")


@ok("inspect_targets(example_inputs=...) reports a forward that fails after conversion")
def _():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = inspect_targets(Mlp(), STLConfig(), example_inputs=(torch.randn(4, 16),))
    assert "row_tile" in rep.example_error, rep.example_error


@ok("inspect_targets(example_inputs=...) also catches a failure that only happens in eval()")
def _():
    class EvalFlattens(nn.Module):  # like fused eval paths: a different code path outside training
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = self.fc(x if self.training else x.reshape(-1, x.shape[-1]))
            return self.head(h)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = inspect_targets(EvalFlattens(), STLConfig(), example_inputs=(torch.randn(2, 8, 16),))
    assert "row_tile" in rep.example_error, rep.example_error


@ok("inspect_targets changes nothing")
def _():
    m = Mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inspect_targets(m, STLConfig(), example_inputs=(torch.randn(2, 8, 16),))
    assert all(type(c) is nn.Linear for c in (m.fc1, m.fc2, m.head))


@ok("meta model -> strassenify_ -> to_empty -> load_state_dict equals the same conversion on CPU")
def _():
    dense, model = _converted(init="strassen_x_strassen", rank=None)
    with torch.device("meta"):
        meta = Mlp()
    strassenify_(meta, STLConfig(init="strassen_x_strassen", rank=None, keep_dense_weight=False))
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 16)
    _close(meta(x), model(x), tol=0)

# =============================================================================== calibrate_
def _cal(batches=None, **kw):
    dense, model = _converted()
    calibrate_(model, _batches() if batches is None else batches, reference=dense, progress=False, **kw)


bad("calibrate_(ridge=-1) (issue: error rose 1.38 -> 5.33)", lambda: _cal(ridge=-1), ValueError, arg="ridge",
    fix=">= 0")
bad("calibrate_(ridge=nan)", lambda: _cal(ridge=float("nan")), ValueError, arg="ridge", fix="finite")
bad("calibrate_(ridge='small')", lambda: _cal(ridge="small"), ValueError, arg="ridge", fix="number")
bad("calibrate_(alternate=-3) (issue: treated as 0)", lambda: _cal(alternate=-3), ValueError, arg="alternate",
    fix="integer >= 0")
bad("calibrate_(alternate=1.5)", lambda: _cal(alternate=1.5), ValueError, arg="alternate", fix="integer >= 0")
bad("calibrate_ on an all-zero batch (issue: w_hat set to 0)", lambda: _cal([torch.zeros(4, 8, 16)]), ValueError,
    arg=("fc1", "zero"), fix="real data")
bad("calibrate_ on a NaN batch (issue: lstsq INTERNAL ASSERT)", lambda: _cal([torch.full((4, 8, 16), float("nan"))]),
    ValueError, arg=("fc1", "NaN", "batch 0"), fix="clean the batches")
bad("calibrate_ on a batch with one Inf", lambda: _cal([_batches(1)[0].index_put_((torch.tensor(0),), torch.tensor(math.inf))]),
    ValueError, arg=("fc1", "infinite"), fix="clean")
bad("calibrate_ batches with the wrong feature size (issue: mat1 and mat2 ...)",
    lambda: _cal([torch.randn(4, 8, 12)]), ValueError, arg=("fc1", "16 features", "(4, 8, 12)"), fix="model's inputs")


def _cal_dense_first():
    torch.manual_seed(0)
    dense = Mlp()
    model = copy.deepcopy(dense)
    strassenify_(model, STLConfig(), targets=["fc2"])
    calibrate_(model, [torch.randn(4, 8, 12)], reference=dense, progress=False)


bad("calibrate_ wrong feature size into a dense first layer", _cal_dense_first, RuntimeError,
    arg=("batch 0", "(4, 8, 12)"), fix="model inputs")
bad("calibrate_ with an empty list of batches", lambda: _cal([]), ValueError, arg="batches", fix="pass a few batches")


def _cal_no_dense():
    _, model = _converted(keep_dense_weight=False)
    calibrate_(model, _batches(), progress=False)


bad("calibrate_ without reference or kept dense weights", _cal_no_dense, ValueError, arg="reference",
    fix="keep_dense_weight=True")


def _cal_wrong_reference():
    _, model = _converted()
    calibrate_(model, _batches(), reference=nn.Sequential(nn.Linear(16, 32)), progress=False)


bad("calibrate_ with a reference model of other names", _cal_wrong_reference, KeyError, arg="reference",
    fix="same module names")
bad("calibrate_(layers=[not an STL layer])", lambda: _cal(layers=["head"]), KeyError, arg="head", fix="STLinear")
bad("calibrate_ NaN heldout batch", lambda: _cal(heldout=[torch.full((4, 8, 16), float("nan"))]), ValueError,
    arg=("heldout batch 0", "NaN"), fix="clean")


@ok("calibrate_(layers='fc1') takes a single name")
def _():
    dense, model = _converted()
    rep = calibrate_(model, _batches(), reference=dense, layers="fc1", progress=False)
    assert [c.name for c in rep.layers] == ["fc1"]


@ok("calibrate_ on a model without STL layers warns and returns an empty report", warns=("no STLinear",))
def _():
    assert calibrate_(Mlp(), _batches(), progress=False).layers == []


@ok("calibrate_ lowers the error and the report matches the float64 objective")
def _():
    dense, model = _converted()
    rep = calibrate_(model, _batches(), reference=dense, alternate=1, progress=False)
    for c in rep.layers:
        assert c.rel_err_after <= c.rel_err_before + 1e-12, c
    x = _batches(1, seed=0)[0]  # the first calibration batch: fc1's real inputs
    y, ref = model.fc1(x).double(), F.linear(x.double(), dense.fc1.weight.double(), model.fc1.bias.double())
    err = float((y - ref).norm() / (ref - model.fc1.bias.double()).norm())
    assert err < rep.layers[0].rel_err_before


# =============================================================================== training
for _field, _val, _fix in [("steps", -1, "integer >= 0"), ("batch_size", 0, "integer >= 1"), ("lr", 0, "> 0"),
                           ("lr", -1e-3, "> 0"), ("task", "regression", "'classification' or 'lm'"),
                           ("grad_clip", 0.0, "> 0 or None"), ("warmup_steps", -1, ">= 0"),
                           ("min_lr_ratio", 2.0, "[0, 1]")]:
    bad(f"TrainConfig({_field}={_val!r})", lambda f=_field, v=_val: TrainConfig(**{f: v}), ValueError, arg=_field,
        fix=_fix)
bad("TrainConfig.from_dict unknown field", lambda: TrainConfig.from_dict({"stepz": 3}), ValueError, arg="stepz",
    fix="fields are")

_X, _Y = torch.randn(64, 16), torch.randint(0, 4, (64,))
_TC = dict(steps=2, batch_size=8, progress=False)
bad("train: x and y of different lengths", lambda: train(Mlp(), (_X, _Y[:10]), TrainConfig(**_TC)), ValueError,
    arg=("x has 64", "y has 10"), fix="samples")
bad("train: batch_size larger than the data", lambda: train(Mlp(), (_X[:4], _Y[:4]), TrainConfig(**_TC)), ValueError,
    arg="batch_size=8", fix="larger than the dataset")
bad("train(resume=True) without out_dir", lambda: train(Mlp(), (_X, _Y), TrainConfig(**_TC), resume=True),
    ValueError, arg="resume=True", fix="out_dir")
bad("train: lr_groups pattern matching nothing",
    lambda: train(Mlp(), (_X, _Y), TrainConfig(**_TC, lr_groups={"nope": 0.1})), ValueError, arg="nope",
    fix="names look like")
bad("train: hidden_kd without a teacher", lambda: train(Mlp(), (_X, _Y), TrainConfig(**_TC, hidden_kd={"fc1": "fc1"})),
    ValueError, arg="hidden_kd", fix="teacher")
bad("train: config of the wrong type", lambda: train(Mlp(), (_X, _Y), {"steps": 2}), TypeError, arg="config",
    fix="TrainConfig")


def _nonfinite():
    m = Mlp()
    with torch.no_grad():
        m.head.bias.fill_(float("inf"))
    train(m, (_X, _Y), TrainConfig(**_TC))


bad("train: non-finite loss stops the run", _nonfinite, NonFiniteLossError, arg="non-finite loss",
    fix="checkpoint")

# =============================================================================== checkpoints
def _two_checkpoints(d):
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(d, 10, m, opt)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1)
    save_checkpoint(d, 20, m, opt)
    return good


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: max(1, len(data) // 3)]
    else:  # overwrite the last bytes (tensor data) with 0xff: NaNs in float32
        data[-8:] = b"\xff" * 8
    with open(path, "wb") as f:
        f.write(bytes(data))


def _fallback_case(file, how, expect_step=10):
    def run():
        with _tmpdir() as d:
            good = _two_checkpoints(d)
            target = os.path.join(d, "checkpoints", file if "/" not in file else file)
            if file.endswith("latest.json"):
                open(target, "w").write(how)
            else:
                _damage(os.path.join(d, "checkpoints", "step_00000020", file), how)
            ck = latest_checkpoint(d)
            assert ck.endswith(f"step_{expect_step:08d}"), ck
            m = nn.Linear(4, 3)
            assert load_checkpoint(ck, m, restore_rng=False)["step"] == expect_step
            if expect_step == 10:
                assert all(torch.equal(good[k], v) for k, v in m.state_dict().items())
    return run


ok("truncated latest model.safetensors: falls back to the intact older checkpoint with a warning",
   _fallback_case("model.safetensors", "truncate"), warns=("model.safetensors", "falling back"))
ok("overwritten bytes in model.safetensors (issue: loaded NaN weights): fallback with a warning",
   _fallback_case("model.safetensors", "overwrite"), warns=("model.safetensors", "sha-256"))
ok("truncated state.json: fallback with a warning naming it", _fallback_case("state.json", "truncate"),
   warns=("state.json", "falling back"))
ok("truncated state.safetensors: fallback with a warning naming it", _fallback_case("state.safetensors", "truncate"),
   warns=("state.safetensors",))
ok("truncated latest.json: uses the newest intact checkpoint, warning names latest.json",
   _fallback_case("latest.json", '{"ste', expect_step=20), warns=("latest.json",))
ok("foreign latest.json: uses the newest intact checkpoint, warning names latest.json",
   _fallback_case("latest.json", '{"foo": 1}', expect_step=20), warns=("latest.json",))


def _all_damaged():
    with _tmpdir() as d:
        _two_checkpoints(d)
        for step in ("step_00000010", "step_00000020"):
            _damage(os.path.join(d, "checkpoints", step, "model.safetensors"), "truncate")
        latest_checkpoint(d)


bad("every checkpoint damaged", _all_damaged, CorruptCheckpointError,
    arg=("step_00000010/model.safetensors", "step_00000020/model.safetensors"), fix="delete")


def _direct_load(how):
    def run():
        with _tmpdir() as d:
            _two_checkpoints(d)
            ck = os.path.join(d, "checkpoints", "step_00000020")
            _damage(os.path.join(ck, "model.safetensors"), how)
            load_checkpoint(ck, nn.Linear(4, 3), verify=how == "overwrite")
    return run


bad("load_checkpoint on a truncated model file (issue: 'incomplete metadata', no path)", _direct_load("truncate"),
    CorruptCheckpointError, arg="step_00000020/model.safetensors", fix="damaged")
bad("load_checkpoint on overwritten bytes", _direct_load("overwrite"), CorruptCheckpointError,
    arg="model.safetensors", fix="SHA-256")


def _foreign_state():
    with _tmpdir() as d:
        _two_checkpoints(d)
        ck = os.path.join(d, "checkpoints", "step_00000020")
        open(os.path.join(ck, "state.json"), "w").write('{"hello": "world"}')
        load_checkpoint(ck, nn.Linear(4, 3), verify=False)


bad("load_checkpoint with a foreign state.json (issue: bare KeyError)", _foreign_state, CorruptCheckpointError,
    arg="state.json", fix="save_checkpoint")


def _wrong_model():
    with _tmpdir() as d:
        _two_checkpoints(d)
        load_checkpoint(os.path.join(d, "checkpoints", "step_00000020"), nn.Linear(4, 5))


bad("load_checkpoint into a model of another shape", _wrong_model, RuntimeError,
    arg="model.safetensors", fix="size mismatch")


@ok("a checkpoint round trip is bit-identical and SHA256SUMS verifies")
def _():
    with _tmpdir() as d:
        torch.manual_seed(0)
        m = nn.Linear(4, 3)
        ck = save_checkpoint(d, 1, m)
        assert os.path.exists(os.path.join(ck, "SHA256SUMS"))
        m2 = nn.Linear(4, 3)
        load_checkpoint(ck, m2)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


# =============================================================================== CLI (one line, exit 2)
class CliError(Exception):
    """Exit status 2 with the stderr text (one line, as argparse does)."""


def _cli(*argv):
    from strassenkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    text = err.getvalue()
    if rc == 2:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) != 1:
            raise RuntimeError(f"exit 2 but {len(lines)} lines on stderr: {text[-500:]}")
        raise CliError(lines[0])
    if rc != 0:
        raise RuntimeError(f"exit status {rc}: {text[-500:]}")
    return text


_FAST = ("--task", "synthetic", "--steps", "2", "--batch-size", "8", "--ckpt-every", "0", "--eval-every", "0",
         "--no-progress")


def _cli_out(*argv):
    with _tmpdir() as d:
        return _cli("train", "--out", os.path.join(d, "run"), *argv)


bad("CLI train --steps -5", lambda: _cli_out("--steps", "-5"), CliError, arg="steps", fix="integer >= 0")
bad("CLI train --lr 0", lambda: _cli_out("--lr", "0", "--steps", "1"), CliError, arg="lr", fix="> 0")
bad("CLI train --config missing.json", lambda: _cli_out("--config", "/nonexistent/missing.json"), CliError,
    arg="--config /nonexistent/missing.json", fix="cannot read")


def _cli_config(text):
    with _tmpdir() as d:
        path = os.path.join(d, "c.json")
        open(path, "w").write(text)
        _cli("train", "--out", os.path.join(d, "run"), "--config", path)


bad("CLI train --config not JSON", lambda: _cli_config("{oops"), CliError, arg="--config", fix="not valid JSON")
bad("CLI train --config unknown key", lambda: _cli_config('{"taks": "digits"}'), CliError, arg="taks",
    fix="allowed")
bad("CLI train --stl --spn", lambda: _cli_out("--stl", "--spn", *_FAST), CliError, arg=("--stl", "--spn"),
    fix="choose one")
bad("CLI train --stl --init bogus", lambda: _cli_out("--stl", "--init", "bogus", *_FAST), CliError,
    arg="init='bogus'", fix="catalogue")
bad("CLI train --calibrate-batches without --from-dense", lambda: _cli_out("--stl", "--calibrate-batches", "2", *_FAST),
    CliError, arg="calibrate", fix="from_dense")
bad("CLI train --from-dense of an empty directory", lambda: _cli_out("--stl", "--from-dense", "/nonexistent/run", *_FAST),
    CliError, arg="/nonexistent/run", fix="train a dense model there first")


def _resumed(*more, check=None):
    def run():
        with _tmpdir() as d:
            out = os.path.join(d, "run")
            _cli("train", "--out", out, *_FAST, "--stl")
            text = _cli("train", "--out", out, "--resume", *more)
            if check:
                check(out, text)
    return run


bad("CLI train --resume with another --lr/--task (issue: ran the stored config silently)",
    _resumed("--lr", "0.5", "--task", "digits"), CliError, arg=("--lr 0.5", "--task 'digits'", "the run has"),
    fix="original options")
bad("CLI train --resume with fewer --steps", _resumed("--steps", "1"), CliError, arg=("--steps 1", "step 2"),
    fix="new --out")
bad("CLI train --resume with another --rank", _resumed("--stl", "--rank", "12"), CliError, arg="--rank 12",
    fix="original options")


def _more_steps(out, text):
    assert "--steps: 2 -> 4" in text, text
    assert json.load(open(os.path.join(out, "checkpoints", "latest.json")))["step"] == 4


ok("CLI train --resume --steps 4: more steps is applied and said so", _resumed("--steps", "4", check=_more_steps))


def _same(out, text):
    assert json.load(open(os.path.join(out, "summary.json")))["step"] == 2


ok("CLI train --resume with the same options continues the stored run", _resumed(*_FAST, "--stl", check=_same))


def _cli_corrupt():
    with _tmpdir() as d:
        out = os.path.join(d, "run")
        _cli("train", "--out", out, *_FAST)
        ck = latest_checkpoint(out)
        _damage(os.path.join(ck, "model.safetensors"), "truncate")
        _cli("train", "--out", out, "--resume")


bad("CLI train --resume with the only checkpoint damaged", _cli_corrupt, CliError, arg="model.safetensors",
    fix="delete")
bad("CLI unknown command", lambda: _argparse_exit("nope"), CliError, arg="nope", fix="choose from")


def _argparse_exit(*argv):
    from strassenkit.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(list(argv))
    except SystemExit as e:
        if e.code == 2:
            raise CliError(err.getvalue().strip().splitlines()[-1]) from None
        raise

# =============================================================================== SPN layers, cost
bad("SPNLinear(rank=0)", lambda: sk.SPNLinear(8, 4, rank=0), ValueError, arg="rank", fix="integer >= 1")
bad("SPNLinear(in_features=0)", lambda: sk.SPNLinear(0, 4, rank=2), ValueError, arg="in_features", fix="integer >= 1")
bad("SPNConv2d(kernel_size=0)", lambda: sk.SPNConv2d(3, 4, 0, rank=2), ValueError, arg="kernel_size", fix=">= 1")
bad("SPNConv2d forward with the wrong channels", lambda: sk.SPNConv2d(3, 4, 3, rank=4)(torch.randn(1, 2, 8, 8)),
    ValueError, arg="(batch, 3, H, W)", fix="(1, 2, 8, 8)")
bad("SPNLinear forward wrong feature size", lambda: sk.SPNLinear(8, 4, rank=4)(torch.randn(2, 7)), ValueError,
    arg="(..., 8)", fix="(2, 7)")
bad("set_phase('bogus')", lambda: sk.set_phase(nn.Sequential(sk.SPNLinear(8, 4, rank=4)), "bogus"), ValueError,
    arg="phase", fix="'ternary'")


@ok("SPNLinear on an empty batch, like nn.Linear")
def _():
    assert sk.SPNLinear(8, 4, rank=4)(torch.randn(0, 8)).shape == (0, 4)


@ok("SPNLinear.to_dense equals the layer in float64")
def _():
    torch.manual_seed(0)
    layer = sk.SPNLinear(8, 5, rank=6).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    _close(layer.to_dense()(x), layer(x), tol=1e-12)


bad("cost.count on a non-module", lambda: sk.cost.count("model", torch.randn(2, 4, 16)), TypeError, arg="model",
    fix="nn.Module")
bad("cost.count with a wrongly sized input", lambda: sk.cost.count(STLinear(16, 8), torch.randn(2, 4, 12)),
    ValueError, arg="(..., 16)", fix="(2, 4, 12)")


@ok("cost.count agrees with torch's flop counter on a dense layer")
def _():
    from torch.utils.flop_counter import FlopCounterMode

    m, x = nn.Linear(16, 8), torch.randn(2, 5, 16)
    with FlopCounterMode(display=False) as fc:
        m(x)
    assert sk.cost.count(m, x).macs * 2 == fc.get_total_flops()


def counts(results) -> dict[str, int]:
    """{verdict: number of cases} for ``results`` [(case, verdict, detail)], every verdict listed."""
    out = {v: 0 for v in VERDICTS}
    for _c, v, _d in results:
        out[v] += 1
    return out
