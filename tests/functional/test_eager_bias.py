"""The eager training path with the bias taken by the kernels (EagerSTL with bias): same values and gradients
as the reference + bias, bitwise the same y as the custom op + ``add_``, and one autograd node per layer."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strassenkit.functional.ops as ops
from strassenkit.functional import native, stl_apply, stl_apply_reference
from strassenkit.nn import STLinear

BACKENDS = ["torch"] + (["native"] if native.available() else [])


def _operands(lead, M, K, N, fmt, r, dtype=torch.float64, seed=0):
    n, m, p = fmt
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return mk(*lead, M, K), mk(r, -(-K // m), -(-N // p)), mk(r, n * m), mk(n * p, r), mk(N)


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    M=st.integers(1, 11), K=st.integers(1, 13), N=st.integers(1, 13),
    fmt=st.sampled_from([(4, 4, 4), (2, 2, 2), (1, 4, 4), (2, 3, 4)]), r=st.integers(1, 9),
    seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS), fused=st.sampled_from(["auto", "on", "off"]),
)
def test_bias_path_matches_reference_float64(lead, M, K, N, fmt, r, seed, backend, fused):
    x, w, e, d, b = _operands(lead, M, K, N, fmt, r, seed=seed)
    gy = torch.randn(*lead, M, N, dtype=torch.float64)
    with ops.backend(backend), ops.fused(fused):
        y = stl_apply(x, w, e, d, fmt, N, bias=b)
        fast = (y, *torch.autograd.grad(y, (x, w, e, d, b), gy))
    yr = stl_apply_reference(x, w, e, d, fmt, N) + b
    ref = (yr, *torch.autograd.grad(yr, (x, w, e, d, b), gy))
    for name, a, c in zip(("y", "x", "w_hat", "enc_x", "dec", "bias"), fast, ref):
        assert a.shape == c.shape, name
        assert (a - c).abs().max() / c.abs().max().clamp(min=1.0) <= 1e-12, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 16, 32, 24), (3, 10, 20, 36), (1, 64, 128, 384)])
def test_bias_path_bitwise_equals_custom_op_plus_add(backend, shape):
    """y: the kernels' in-place bias add rounds once, exactly like ``y.add_(bias)`` after the op; the gradients of
    x, w_hat, enc_x, dec come from the same backward."""
    B, M, K, N = shape
    x, w, e, d, b = _operands((B,), M, K, N, (4, 4, 4), 24, dtype=torch.float32, seed=B * M)
    gy = torch.randn(B, M, N)
    with ops.backend(backend):
        y = stl_apply(x, w, e, d, 4, N, bias=b)
        assert type(y.grad_fn).__name__ == "EagerSTLBackward"  # the bias went into the op: one node
        grads = torch.autograd.grad(y, (x, w, e, d, b), gy)
        y_op = ops.stl_forward(x, w, e, d, 4, 4, 4, N)[0]
        y_op = y_op + b
        grads_op = torch.autograd.grad(y_op, (x, w, e, d, b), gy)
    assert torch.equal(y, y_op)
    for name, a, c in zip(("x", "w_hat", "enc_x", "dec"), grads[:4], grads_op[:4]):
        assert torch.equal(a, c), name
    torch.testing.assert_close(grads[4], grads_op[4], rtol=1e-6, atol=1e-5)


def test_bias_path_only_when_dtypes_agree():
    """A bias in another dtype than x (or a compute dtype other than x's) keeps the separate add: still right."""
    x, w, e, d, b = _operands((2,), 8, 12, 8, (4, 4, 4), 6, dtype=torch.float32)
    b64 = b.detach().double().requires_grad_()
    assert not ops.eager_bias_ok(x, b64)
    y = stl_apply(x, w, e, d, 4, 8, bias=b64)
    assert type(y.grad_fn).__name__ != "EagerSTLBackward"
    ref = stl_apply_reference(x.double(), w.double(), e.double(), d.double(), 4, 8) + b64
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_stlinear_training_step_partial_grads():
    """Frozen bias, frozen codecs: only what is asked for gets a gradient, through the one-node path."""
    torch.manual_seed(0)
    layer = STLinear(16, 12, tile=4, rank=8)
    layer.bias.requires_grad_(False)
    layer.enc_x.requires_grad_(False)
    x = torch.randn(2, 8, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.bias.grad is None and layer.enc_x.grad is None
    assert layer.w_hat.grad is not None and layer.dec.grad is not None and x.grad is not None
    layer.bias.requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((12,), 16.0))
