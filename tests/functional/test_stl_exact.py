import pytest
import torch
from hypothesis import given, settings, strategies as st

from strassenkit.algorithms import available, get
from strassenkit.functional import (
    stl_apply,
    stl_apply_reference,
    stl_encode_weight,
    stl_encode_weight_reference,
    stl_matmul,
)

FAST = [n for n in available() if get(n).rank < 100]  # strassen_x_laderman is slow in float64 checks


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", available())
def test_exact_algorithms_equal_matmul_float64(name):
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    x = torch.randn(2, 13, 19, dtype=torch.float64, generator=g)  # sizes not multiples of any tile
    w = torch.randn(19, 11, dtype=torch.float64, generator=g)
    assert _rel(stl_matmul(x, w, name), x @ w) <= 1e-12


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(FAST),
    lead=st.lists(st.integers(1, 3), max_size=2),
    M=st.integers(1, 17), K=st.integers(1, 17), N=st.integers(1, 17),
)
def test_exact_on_random_shapes_fast_and_reference(name, lead, M, K, N):
    x = torch.randn(*lead, M, K, dtype=torch.float64)
    w = torch.randn(K, N, dtype=torch.float64)
    ref = x @ w
    fast = stl_matmul(x, w, name)
    slow = stl_matmul(x, w, name, reference=True)
    assert fast.shape == ref.shape == slow.shape
    scale = ref.abs().max().clamp(min=1.0)
    assert ((fast - ref).abs().max() / scale) <= 1e-12
    assert ((fast - slow).abs().max() / scale) <= 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_low_precision_dtypes(dtype, tol):
    x = torch.randn(4, 32, 48)
    w = torch.randn(48, 40)
    y = stl_matmul(x.to(dtype), w.to(dtype), "strassen_x_strassen")
    assert y.dtype == dtype
    assert _rel(y.double(), x.double() @ w.double()) <= tol


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 9), n=st.integers(1, 3), m=st.integers(1, 3), p=st.integers(1, 3),
       M=st.integers(1, 9), K=st.integers(1, 9), N=st.integers(1, 9), lead=st.integers(1, 3))
def test_fast_path_matches_reference_for_arbitrary_codecs(r, n, m, p, M, K, N, lead):
    """Random (non-exact) encoders/decoders: both paths compute the same bilinear map."""
    enc_x = torch.randn(r, n * m, dtype=torch.float64)
    enc_w = torch.randn(r, m * p, dtype=torch.float64)
    dec = torch.randn(n * p, r, dtype=torch.float64)
    x = torch.randn(lead, M, K, dtype=torch.float64)
    w = torch.randn(K, N, dtype=torch.float64)
    tile = (n, m, p)
    w_hat = stl_encode_weight(w, enc_w, tile)
    assert torch.allclose(w_hat, stl_encode_weight_reference(w, enc_w, tile))
    y = stl_apply(x, w_hat, enc_x, dec, tile, out_features=N)
    y_ref = stl_apply_reference(x, w_hat, enc_x, dec, tile, out_features=N)
    assert y.shape == (lead, M, N)
    assert torch.allclose(y, y_ref, atol=1e-10)


def test_gradcheck_functional_ops():
    r, t = 5, 2
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w_hat = torch.randn(r, 3, 2, dtype=torch.float64, requires_grad=True)
    enc_x = torch.randn(r, t * t, dtype=torch.float64, requires_grad=True)
    dec = torch.randn(t * t, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: stl_apply(*a, t, out_features=3), (x, w_hat, enc_x, dec))
    assert torch.autograd.gradcheck(lambda *a: stl_apply_reference(*a, t, out_features=3), (x, w_hat, enc_x, dec))
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    enc_w = torch.randn(r, t * t, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: stl_encode_weight(a, b, t), (w, enc_w))


def test_rows_of_different_matrices_never_mix():
    """A non-exact codec mixes rows inside a tile, but never across leading (sample) indices."""
    enc_x, dec = torch.randn(6, 16, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    w_hat = torch.randn(6, 3, 2, dtype=torch.float64)
    x = torch.randn(3, 6, 12, dtype=torch.float64)  # M=6 is padded to 8 per sample
    y = stl_apply(x, w_hat, enc_x, dec, 4, out_features=8)
    x2 = x.clone()
    x2[1] = torch.randn(6, 12, dtype=torch.float64)
    y2 = stl_apply(x2, w_hat, enc_x, dec, 4, out_features=8)
    assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2])
    assert not torch.allclose(y[1], y2[1])
    # inside one matrix, rows of a tile do mix (so the check above is meaningful)
    x3 = x.clone()
    x3[0, 1] += 1.0
    y3 = stl_apply(x3, w_hat, enc_x, dec, 4, out_features=8)
    assert not torch.allclose(y3[0, 0], y[0, 0])


def test_clear_errors():
    x, w = torch.randn(4, 8), torch.randn(8, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        stl_matmul(x, torch.randn(7, 4), "strassen")
    with pytest.raises(TypeError, match="floating-point"):
        stl_matmul(x.long(), w, "strassen")
    with pytest.raises(TypeError, match="BilinearAlgorithm"):
        stl_matmul(x, w, 3)
    with pytest.raises(KeyError, match="unknown algorithm"):
        stl_matmul(x, w, "nope")
    enc_x, dec = torch.randn(7, 4), torch.randn(4, 7)
    w_hat = stl_encode_weight(w, torch.randn(7, 4), 2)
    with pytest.raises(ValueError, match="tile sizes must be >= 1"):
        stl_apply(x, w_hat, enc_x, dec, 0)
    with pytest.raises(ValueError, match="enc_x must have shape"):
        stl_apply(x, w_hat, torch.randn(7, 9), dec, 2)
    with pytest.raises(ValueError, match="dec must have shape"):
        stl_apply(x, w_hat, enc_x, torch.randn(4, 6), 2)
    with pytest.raises(ValueError, match="w_hat must have shape"):
        stl_apply(torch.randn(4, 10), w_hat, enc_x, dec, 2)
