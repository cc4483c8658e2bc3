"""The fused native path (csrc "fused path"), the eager shortcuts of stl_apply, and the output pool.

- torch.ops.strassenkit_native.fused_forward / fused_backward against the float64 einsum reference
  (stl_apply_reference and its autograd gradients) on random shapes, tile formats, ranks, block sizes
  and thread counts; saved x_hat / prod equal to the unfused path's; bitwise reruns per thread count.
- stl_apply's eager shortcuts (no-grad inference without the custom op, the autograd.Function for eager
  training) give bit-identical values to the custom op; bias in the kernel equals y + bias.
- Pooled outputs: reused blocks are fully overwritten (no stale values), stats and limits work.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strassenkit.functional.ops as ops
from strassenkit.functional import native, stl_apply, stl_apply_reference
from strassenkit.nn import STLinear

NATIVE_OK = native.available()
requires_native = pytest.mark.skipif(not NATIVE_OK, reason="native STL kernels unavailable")
FORMATS = st.one_of(
    st.sampled_from([(4, 4, 4), (2, 3, 2), (1, 4, 4), (4, 1, 4), (3, 5, 2)]),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
)


@contextlib.contextmanager
def _threads(k):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _rows(R):
    """Force R tile rows per fused block (0 = the kernel's own choice)."""
    torch.ops.strassenkit_native.fused_rows(R)
    try:
        yield
    finally:
        torch.ops.strassenkit_native.fused_rows(0)


def _operands(B, M, K, N, fmt, r, dtype, seed):
    n, m, p = fmt
    g = torch.Generator().manual_seed(seed)
    Kt, Nt = -(-K // m), -(-N // p)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    return rnd(B, M, K), rnd(r, Kt, Nt), rnd(r, n * m), rnd(n * p, r), rnd(B, M, N)


def _reference(x, w, e, d, fmt, N, gy):
    ps = [t.detach().double().requires_grad_() for t in (x, w, e, d)]
    y = stl_apply_reference(*ps, fmt, N)
    y.backward(gy.double())
    return y.detach(), [t.grad for t in ps]


def _close(a, b, tol, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if b.numel():
        err = (a.double() - b).abs().max().item()
        assert err <= tol * b.abs().max().clamp(min=1e-6).item(), f"{what}: {err:.3g}"


@requires_native
@settings(max_examples=40, deadline=None)
@given(fmt=FORMATS, r=st.integers(1, 30), B=st.integers(1, 3), M=st.integers(1, 40), K=st.integers(1, 90),
       N=st.integers(1, 90), rows=st.sampled_from([0, 1, 3, 7]), threads=st.sampled_from([1, 2]),
       needs=st.tuples(*[st.booleans()] * 4), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_ops_match_float64_reference(fmt, r, B, M, K, N, rows, threads, needs, bias, seed):
    n, m, p = fmt
    x, w, e, d, gy = _operands(B, M, K, N, fmt, r, torch.float64, seed)
    b = torch.randn(N, dtype=torch.float64) if bias else None
    nat = torch.ops.strassenkit_native
    yr, grads = _reference(x, w, e, d, fmt, N, gy)
    with _threads(threads), _rows(rows):
        y, xh, prod = nat.fused_forward(x, w, e, d, n, m, p, N, True)
        y_lean, xh0, prod0 = nat.fused_forward(x, w, e, d, n, m, p, N, False, b)
        out = nat.fused_backward(gy, x, w, e, d, xh, prod, n, m, p, *needs)
        again = nat.fused_backward(gy, x, w, e, d, xh, prod, n, m, p, *needs)
    assert xh0.numel() == prod0.numel() == 0
    _close(y, yr, 1e-12, "y")
    assert torch.equal(y_lean, y if b is None else y + b), "y (+ bias) without saving differs"
    with ops.backend("torch"):  # the saved intermediates mean what the unfused path's mean
        Mt, Kt = -(-M // n), w.shape[1]
        xh_ref, _ = ops._encode(x, e, n, m, Mt, Kt)
        _close(xh, xh_ref, 1e-12, "x_hat")
        _close(prod, torch.bmm(xh_ref, w), 1e-12, "prod")
    for name, g, gref, need, g2 in zip(("x", "w_hat", "enc_x", "dec"), out, grads, needs, again):
        if need:
            _close(g, gref, 1e-11, f"grad {name}")
        else:
            assert g.numel() == 0, name
        assert torch.equal(g, g2), f"grad {name} differs between two runs with {threads} threads"


@requires_native
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_float32_and_bitwise_reruns(threads):
    fmt, N = (4, 4, 4), 200
    x, w, e, d, gy = _operands(3, 70, 130, N, fmt, 24, torch.float32, seed=1)
    ref_y, ref_g = _reference(x, w, e, d, fmt, N, gy)
    nat = torch.ops.strassenkit_native
    with _threads(threads):
        runs = []
        for _ in range(2):
            y, xh, prod = nat.fused_forward(x, w, e, d, 4, 4, 4, N, True)
            runs.append((y, *nat.fused_backward(gy, x, w, e, d, xh, prod, 4, 4, 4, True, True, True, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _close(runs[0][0], ref_y, 1e-5, "y")
    for g, gref, name in zip(runs[0][1:], ref_g, ("x", "w_hat", "enc_x", "dec")):
        _close(g, gref, 2e-5, name)


@requires_native
@pytest.mark.parametrize("fused", ["on", "off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_eager_shortcuts_equal_the_custom_op_bitwise(fused, dtype):
    """No-grad inference and eager training skip the custom op's dispatch: the values are the op's, bit for bit."""
    torch.manual_seed(0)
    layer = STLinear(72, 40, rank=20, dtype=dtype)
    x = torch.randn(2, 33, 72).to(dtype)
    gy = torch.randn(2, 33, 40).to(dtype)
    args = (x, layer.w_hat, layer.enc_x, layer.dec, layer.format)
    with ops.fused(fused):
        with torch.no_grad():
            lean = layer(x)
        assert ops.plain_eager(x.reshape(2, 33, 72), layer.w_hat)
        direct = ops.stl_forward(x, layer.w_hat.detach(), layer.enc_x.detach(), layer.dec.detach(), *layer.format, 40)[0]
        xg = x.clone().requires_grad_()
        eager = layer(xg)
        eager.backward(gy)
        ps = [xg.detach().clone().requires_grad_(), *(t.detach().clone().requires_grad_() for t in args[1:4])]
        y_op = ops.stl_forward(*ps, *layer.format, 40)[0]
        (y_op + layer.bias.detach()).backward(gy)
    assert torch.equal(lean, eager.detach())
    assert torch.equal(lean, direct + layer.bias.detach())  # bias added in the kernel == custom op + bias
    assert torch.equal(eager.detach(), (y_op + layer.bias.detach()).detach())
    for a, b in zip((xg.grad, layer.w_hat.grad, layer.enc_x.grad, layer.dec.grad), (p.grad for p in ps)):
        assert torch.equal(a, b)


def test_eager_shortcut_not_taken_under_modes():
    x = torch.randn(1, 4, 8)
    assert ops.plain_eager(x)
    with torch.device("cpu"):  # a torch-function mode
        assert not ops.plain_eager(x)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not ops.plain_eager(x)
    assert not ops.plain_eager(x.to("meta"))


def test_stl_apply_bias_checked_and_added():
    x, w, e, d = torch.randn(2, 8, 12), torch.randn(24, 3, 4), torch.randn(24, 16), torch.randn(16, 24)
    b = torch.randn(16)
    assert torch.allclose(stl_apply(x, w, e, d, 4, 16, bias=b), stl_apply(x, w, e, d, 4, 16) + b, atol=1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        stl_apply(x, w, e, d, 4, 16, bias=torch.randn(15))
    with pytest.raises(TypeError, match="bias"):
        stl_apply(x, w, e, d, 4, 16, bias=torch.ones(16, dtype=torch.int64))


@requires_native
def test_pooled_outputs_are_fully_overwritten_and_counted():
    nat = torch.ops.strassenkit_native
    cached0, _in_use0, hits0, misses0, limit = nat.pool_stats()
    assert limit > 0
    x, w, e, d, _ = _operands(4, 256, 256, 256, (4, 4, 4), 24, torch.float32, seed=3)
    with ops.fused("off"):
        first = stl_apply(x, w, e, d, 4, 256)  # outputs >= 1 MiB come from the pool
        first.fill_(float("nan"))
        del first  # its block goes back to the pool with NaNs in it
        second = stl_apply(x, w, e, d, 4, 256)
    _cached, _in_use, hits, misses, _ = nat.pool_stats()
    assert hits > hits0 and misses >= misses0
    assert torch.isfinite(second).all()
    _close(second, stl_apply_reference(x.double(), w.double(), e.double(), d.double(), 4, 256), 1e-5, "reused block")
    nat.pool_set_limit(0)  # off: outputs come from PyTorch's allocator, the cache is emptied
    try:
        assert nat.pool_stats()[0] == 0
        _close(stl_apply(x, w, e, d, 4, 256), second.double(), 1e-6, "unpooled")
    finally:
        nat.pool_set_limit(limit >> 20)
    assert cached0 >= 0


@requires_native
@settings(max_examples=30, deadline=None)
@given(fmt=FORMATS, r=st.integers(1, 30), B=st.integers(1, 3), M=st.integers(1, 40), N=st.integers(1, 90),
       threads=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_decode_with_bias_equals_decode_plus_bias(fmt, r, B, M, N, threads, dtype, seed):
    """The unfused decode kernel adds the bias per cache-hot chunk: bit for bit y.add_(bias), padding skipped."""
    n, _m, p = fmt
    g = torch.Generator().manual_seed(seed)
    Mt, Nt = -(-M // n), -(-N // p)
    P = torch.randn(r, B * Mt, Nt, generator=g, dtype=torch.float64).to(dtype)
    dec = torch.randn(n * p, r, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    nat = torch.ops.strassenkit_native
    with _threads(threads):
        plain = nat.decode(P, dec, n, p, B, Mt, M, N)
        with_bias = nat.decode(P, dec, n, p, B, Mt, M, N, bias)
    assert torch.equal(with_bias, plain + bias)
    with ops.backend("torch"):
        ref = ops._decode(P.double(), dec.double(), n, p, B, Mt, M, N) + bias.double()
    _close(with_bias, ref, 1e-12 if dtype == torch.float64 else 1e-5, "decode + bias")
    with pytest.raises(RuntimeError, match="bias must be"):
        nat.decode(P, dec, n, p, B, Mt, M, N, bias[:-1] if N > 1 else torch.zeros(2, dtype=dtype))
