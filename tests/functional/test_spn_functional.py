"""Sum-product network math: fast paths vs slow references in float64, gradcheck, shape errors."""

import pytest
import torch

from strassenkit.algorithms import get
from strassenkit.functional.spn import (
    spn_bilinear,
    spn_bilinear_reference,
    spn_conv2d,
    spn_conv2d_reference,
    spn_linear,
    spn_linear_reference,
)

D = torch.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bilinear_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, 3, 6, generator=g, dtype=D), torch.randn(5, 3, 4, generator=g, dtype=D)
    wa, wb, wc = torch.randn(7, 6, generator=g, dtype=D), torch.randn(7, 4, generator=g, dtype=D), torch.randn(9, 7, generator=g, dtype=D)
    out = spn_bilinear(a, b, wa, wb, wc)
    assert out.shape == (5, 3, 9)
    torch.testing.assert_close(out, spn_bilinear_reference(a, b, wa, wb, wc), rtol=1e-12, atol=1e-12)


def test_bilinear_with_strassen_factors_is_matmul():
    U, V, W = get("strassen").factors(D)
    A, B = torch.randn(100, 2, 2, dtype=D), torch.randn(100, 2, 2, dtype=D)
    out = spn_bilinear(A.reshape(100, 4), B.reshape(100, 4), U.T, V.T, W)
    torch.testing.assert_close(out.reshape(100, 2, 2), A @ B, rtol=1e-12, atol=1e-12)
    # a wrong coefficient breaks it (the check can fail)
    W2 = W.clone()
    W2[0, 0] = 0
    assert (spn_bilinear(A.reshape(100, 4), B.reshape(100, 4), U.T, V.T, W2).reshape(100, 2, 2) - A @ B).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 10, generator=g, dtype=D)
    wb, a, wc, bias = (torch.randn(*s, generator=g, dtype=D) for s in ((6, 10), (6,), (8, 6), (8,)))
    torch.testing.assert_close(spn_linear(x, wb, a, wc, bias), spn_linear_reference(x, wb, a, wc, bias), rtol=1e-12, atol=1e-12)


CONV_CASES = [
    # (H, W, k, s, pad(top,bottom,left,right), p, groups)
    (7, 9, (3, 3), (1, 1), (1, 1, 1, 1), (2, 2), 1),
    (8, 5, (3, 3), (2, 2), (0, 0, 0, 0), (3, 3), 2),
    (11, 6, (5, 3), (2, 1), (2, 2, 1, 1), (2, 3), 1),
    (6, 6, (2, 2), (1, 1), (0, 1, 0, 1), (2, 2), 2),  # asymmetric ("same" with an even kernel)
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_reference(case):
    H, W, k, s, pad, p, groups = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    cin, cout, r = 4, 6, 8
    win = ((p[0] - 1) * s[0] + k[0], (p[1] - 1) * s[1] + k[1])
    x = torch.randn(2, cin, H, W, generator=g, dtype=D)
    wb = torch.randn(r, cin // groups, *win, generator=g, dtype=D)
    a = torch.randn(r, generator=g, dtype=D)
    wc = torch.randn(r, cout // groups, *p, generator=g, dtype=D)
    bias = torch.randn(cout, generator=g, dtype=D)
    y = spn_conv2d(x, wb, a, wc, bias, k, s, pad, p, groups)
    ref = spn_conv2d_reference(x, wb, a, wc, bias, k, s, pad, p, groups)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    conv = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pad[2], pad[3], pad[0], pad[1])), torch.zeros(cout, cin // groups, *k, dtype=D), stride=s, groups=groups)
    assert y.shape == conv.shape


def test_gradcheck_linear_bilinear_conv():
    g = torch.Generator().manual_seed(0)
    req = dict(dtype=D, requires_grad=True)
    x = torch.randn(3, 5, generator=g, dtype=D).requires_grad_()
    wb, a, wc, bias = (torch.randn(*s, generator=g, **{"dtype": D}).requires_grad_() for s in ((4, 5), (4,), (3, 4), (3,)))
    assert torch.autograd.gradcheck(spn_linear, (x, wb, a, wc, bias))
    aa, bb = torch.randn(2, 3, generator=g, **req), torch.randn(2, 2, generator=g, **req)
    wa2, wb2, wc2 = torch.randn(4, 3, generator=g, **req), torch.randn(4, 2, generator=g, **req), torch.randn(3, 4, generator=g, **req)
    assert torch.autograd.gradcheck(spn_bilinear, (aa, bb, wa2, wb2, wc2))
    xc = torch.randn(1, 2, 5, 4, generator=g, **req)
    wbc = torch.randn(4, 2, 4, 4, generator=g, **req)  # p=2, s=1, k=3 -> window 4
    ac = torch.randn(4, generator=g, **req)
    wcc = torch.randn(4, 3, 2, 2, generator=g, **req)
    fn = lambda x_, b_, a_, c_: spn_conv2d(x_, b_, a_, c_, None, (3, 3), (1, 1), (1, 1, 1, 1), (2, 2))
    assert torch.autograd.gradcheck(fn, (xc, wbc, ac, wcc))


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="w_b"):
        spn_linear(torch.randn(2, 5), torch.randn(4, 6), torch.randn(4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="a_hat"):
        spn_linear(torch.randn(2, 5), torch.randn(4, 5), torch.randn(3), torch.randn(3, 4))
    with pytest.raises(ValueError, match="w_c"):
        spn_bilinear(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 5))
    with pytest.raises(ValueError, match="too small"):
        spn_conv2d(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 5, 5), torch.ones(1), torch.ones(1, 1, 1, 1), None, (5, 5), (1, 1), (0, 0, 0, 0), (1, 1))
