"""The C++ autograd node for eager training on the fused path (``strassenkit_native::fused_train``): the same
values and gradients as the Python autograd function (EagerSTL) bit for bit, the float64 reference within
rounding, every subset of requires_grad, no graph under no_grad/inference_mode, no double backward."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strassenkit.functional.ops as ops
from strassenkit.functional import native, stl_apply_reference
from strassenkit.nn import STLinear

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")


def _operands(B, M, K, N, fmt, r, dtype, seed, bias=True):
    n, m, p = fmt
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return mk(B, M, K), mk(r, -(-K // m), -(-N // p)), mk(r, n * m), mk(n * p, r), (mk(N) if bias else None)


def _run(fn, ops_in, gy):
    y = fn(*ops_in)
    ins = [t for t in ops_in if t is not None and t.requires_grad]
    return (y, *torch.autograd.grad(y, ins, gy)) if ins else (y,)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), M=st.integers(1, 11), K=st.integers(1, 13), N=st.integers(1, 13),
       fmt=st.sampled_from([(4, 4, 4), (2, 2, 2), (1, 4, 4), (2, 3, 4)]), r=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans(), seed=st.integers(0, 2**16),
       grads=st.sampled_from(["all", "x", "params", "w_hat", "none_x"]))
def test_fused_train_equals_eager_function_bitwise_and_the_reference(B, M, K, N, fmt, r, dtype, bias, seed, grads):
    x, w, e, d, b = _operands(B, M, K, N, fmt, r, dtype, seed, bias)
    keep = {"all": (x, w, e, d, b), "x": (x,), "params": (w, e, d, b), "w_hat": (w,), "none_x": (w, e, d)}[grads]
    for t in (x, w, e, d, b):
        if t is not None and not any(t is k for k in keep):
            t.requires_grad_(False)
    n, m, p = fmt
    gy = torch.randn(B, M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with ops.fused("on"):
        fast = _run(lambda *a: torch.ops.strassenkit_native.fused_train(*a, n, m, p, N), (x, w, e, d, b), gy)
        eager = _run(lambda *a: ops.EagerSTL.apply(*a[:4], n, m, p, N, a[4]), (x, w, e, d, b), gy)
    assert "FusedTrain" in fast[0].grad_fn.name()
    assert len(fast) == len(eager)
    for a, c in zip(fast, eager):
        assert torch.equal(a, c)
    if dtype == torch.float64:
        def ref_fn(x, w, e, d, b):
            y = stl_apply_reference(x, w, e, d, fmt, N)
            return y if b is None else y + b
        ref = _run(ref_fn, (x, w, e, d, b), gy)
        for a, c in zip(fast, ref):
            assert (a - c).abs().max() / c.abs().max().clamp(min=1.0) <= 1e-12


def test_fused_train_on_a_non_contiguous_input():
    x, w, e, d, b = _operands(3, 8, 16, 12, (4, 4, 4), 24, torch.float32, 1)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, other strides
    assert not xt.is_contiguous()
    gy = torch.randn(3, 8, 12)
    with ops.fused("on"):
        a = _run(lambda *t: torch.ops.strassenkit_native.fused_train(*t, 4, 4, 4, 12), (xt, w, e, d, b), gy)
        c = _run(lambda *t: ops.EagerSTL.apply(*t[:4], 4, 4, 4, 12, t[4]), (x, w, e, d, b), gy)
    for u, v in zip(a, c):
        assert torch.equal(u, v)


def test_fused_train_without_a_graph_and_no_double_backward():
    x, w, e, d, b = _operands(2, 8, 16, 12, (4, 4, 4), 24, torch.float32, 0)
    args = (x, w, e, d, b, 4, 4, 4, 12)
    y = torch.ops.strassenkit_native.fused_train(*args)
    with torch.no_grad():
        y_ng = torch.ops.strassenkit_native.fused_train(*args)
    with torch.inference_mode():  # below autograd: the forward kernel alone
        y_inf = torch.ops.strassenkit_native.fused_train(*args)
    assert y_ng.grad_fn is None and not y_inf.requires_grad
    assert torch.equal(y_ng, y) and torch.equal(y_inf, y)
    gx, = torch.autograd.grad(y.sum(), x, create_graph=False)
    y2 = torch.ops.strassenkit_native.fused_train(*args)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y2.sum(), x, create_graph=True)


def test_stlinear_model_training_step_same_with_and_without_the_cpp_node(monkeypatch):
    """A small model's parameter gradients after forward + backward: the C++ node (used by default where fused)
    and the Python autograd function give the same bits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(STLinear(32, 64, tile=4, rank=24), torch.nn.GELU(), STLinear(64, 32, tile=4, rank=24))
    x = torch.randn(4, 16, 32)

    def grads():
        model.zero_grad()
        y = model(x)
        y.pow(2).mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()], y.grad_fn

    y1, g1, fn1 = grads()
    monkeypatch.setitem(ops._FUSED_TRAIN, "ok", False)
    y2, g2, fn2 = grads()
    assert "FusedTrain" in fn1.next_functions[0][0].name() or "FusedTrain" in fn1.name()
    assert "FusedTrain" not in fn2.name()
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
