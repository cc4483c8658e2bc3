"""Ternary quantizers: values against a manual numpy computation, straight-through gradients, errors."""

import numpy as np
import pytest
import torch

from strassenkit.nn.quantize import TernaryQuantizer, ternarize_fixed, ternarize_twn, ternary_parts, twn_threshold_scale


def test_fixed_threshold_values():
    w = torch.tensor([-2.0, -0.6, -0.5, -0.1, 0.0, 0.3, 0.5, 0.51, 3.0])
    q = ternarize_fixed(w, threshold=0.5, scale=2.0)
    assert q.tolist() == [-2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twn_matches_manual_numpy(seed):
    w = torch.randn(13, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = np.abs(w.numpy())
    delta = 0.7 * a.mean()
    alpha = a[a > delta].mean()
    expected = alpha * np.sign(w.numpy()) * (a > delta)
    np.testing.assert_allclose(ternarize_twn(w).numpy(), expected, rtol=1e-14, atol=0)
    t, s = ternary_parts(w, "twn")
    assert t.dtype == torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1}
    np.testing.assert_allclose((t.double() * s).numpy(), expected, rtol=1e-14, atol=0)
    # per output slice
    q = ternarize_twn(w, dim=0).numpy()
    for i in range(13):
        ai = a[i]
        di = 0.7 * ai.mean()
        np.testing.assert_allclose(q[i], ai[ai > di].mean() * np.sign(w[i].numpy()) * (ai > di), rtol=1e-14)


def test_straight_through_gradients():
    w = torch.tensor([-2.0, -0.3, 0.1, 0.7, 1.5], requires_grad=True)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (ternarize_twn(w) * up).sum().backward()
    assert w.grad.tolist() == up.tolist()  # identity STE, even where the output is 0
    w.grad = None
    (ternarize_fixed(w, 0.5, 1.0, clip=1.0) * up).sum().backward()
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # clipped STE: zero where |w| > 1
    w.grad = None
    (TernaryQuantizer("fixed", 0.5, 1.0)(w) * up).sum().backward()
    assert w.grad.tolist() == up.tolist()


def test_quantizer_module_and_errors():
    q = TernaryQuantizer("twn", per_channel=True)
    w = torch.randn(4, 6)
    t, s = q.parts(w)
    torch.testing.assert_close(t.float() * s, q(w))
    with pytest.raises(ValueError, match="mode"):
        TernaryQuantizer("binary")
    with pytest.raises(ValueError, match="scale > threshold"):
        TernaryQuantizer("fixed", threshold=1.0, scale=0.5)
    with pytest.raises(ValueError, match="threshold"):
        ternarize_fixed(w, threshold=-1.0)
    with pytest.raises(ValueError, match="dim"):
        twn_threshold_scale(w, dim=1)
