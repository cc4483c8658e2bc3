"""STLinear's lean inference path (no grad, eager): same values as the checked path, and only where safe."""

import pytest
import torch

from strassenkit.functional import ops
from strassenkit.nn import STLinear, row_mask
from strassenkit.nn import stlinear as stlinear_mod


def _checked(layer, x):
    """The layer's output through the checked path (stl_apply), grad mode off."""
    with torch.no_grad():
        return stlinear_mod.stl_apply(x, layer.w_hat, layer.enc_x, layer.dec, layer.format,
                                      out_features=layer.out_features, bias=layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", ["auto", "on", "off"])
@pytest.mark.parametrize("shape", [(2, 33, 72, 40), (1, 4, 8, 8), (3, 5, 130, 9)])
def test_lean_path_equals_checked_path_bitwise(dtype, fused, shape):
    B, L, K, N = shape
    torch.manual_seed(0)
    layer = STLinear(K, N, rank=20, dtype=dtype)
    x = torch.randn(B, L, K, dtype=dtype)
    with torch.no_grad(), ops.fused(fused):
        assert stlinear_mod._lean_operands(layer, x) is not None
        lean = layer(x)
        ref = _checked(layer, x)
    assert torch.equal(lean, ref)
    assert lean.shape == (B, L, N) and lean.dtype == dtype


def test_lean_path_not_taken_where_a_check_or_mode_matters():
    layer = STLinear(16, 12, rank=8)
    x = torch.randn(2, 8, 16)
    lean = stlinear_mod._lean_operands
    with torch.no_grad():
        assert lean(layer, x) is not None
        assert lean(layer, x[0]) is None  # 2-D: the checked path rejects it with its message
        assert lean(layer, x.double()) is None  # dtype differs from the parameters
        assert lean(layer, x[:, :0]) is None  # empty
        assert lean(layer, torch.randn(2, 8, 15)) is None  # wrong width: the checked path names it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lean(layer, x) is None
        with row_mask(torch.ones(2, 8)):
            assert lean(layer, x) is None  # padding rows must be zeroed first
        with torch.device("cpu"):  # a torch-function mode is watching
            assert lean(layer, x) is None
    assert lean(layer, x) is None  # grad mode on: the autograd path saves what backward needs
    with torch.no_grad(), pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 8, 15))


def test_row_mask_still_zeroes_padding_under_no_grad():
    """The padding safeguard holds on the inference path: a padded sentence's outputs equal its unpadded ones."""
    torch.manual_seed(0)
    layer = STLinear(16, 12, rank=8)
    real = torch.randn(1, 6, 16)
    padded = torch.cat([real, torch.randn(1, 2, 16) * 100], dim=1)  # 2 garbage padding rows share the last tile
    mask = torch.tensor([[1] * 6 + [0] * 2])
    with torch.no_grad():
        alone = layer(real)
        with row_mask(mask):
            batched = layer(padded)
        leaky = layer(padded)  # without the mask the garbage leaks into the real rows of the last tile
    assert torch.allclose(batched[:, :6], alone, atol=1e-5)
    assert not torch.allclose(leaky[:, 4:6], alone[:, 4:6], atol=1e-3)


def test_lean_path_steps_aside_for_parametrized_weights():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = STLinear(16, 12, rank=8)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        before = layer(x)
        parametrize.register_parametrization(layer, "w_hat", Double())
        assert stlinear_mod._lean_operands(layer, x) is None
        after = layer(x)
    assert not torch.allclose(before, after)  # the parametrized (doubled) w_hat was used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", ["auto", "on", "off"])
@pytest.mark.parametrize("shape,bias", [((2, 33, 72, 40), True), ((1, 4, 8, 8), False), ((3, 5, 130, 9), True)])
def test_lean_training_path_equals_checked_path_bitwise(dtype, fused, shape, bias):
    """Grad mode on: forward calls the autograd function directly; y and every gradient equal the checked path's."""
    B, L, K, N = shape
    torch.manual_seed(0)
    layer = STLinear(K, N, rank=20, dtype=dtype, bias=bias)
    x = torch.randn(B, L, K, dtype=dtype, requires_grad=True)
    gy = torch.randn(B, L, N, dtype=dtype)
    params = [p for p in (x, layer.w_hat, layer.enc_x, layer.dec, layer.bias) if p is not None]
    with ops.fused(fused):
        assert stlinear_mod._lean_operands(layer, x, training=True) is not None
        lean = layer(x)
        g_lean = torch.autograd.grad(lean, params, gy)
        ref = stlinear_mod.stl_apply(x, layer.w_hat, layer.enc_x, layer.dec, layer.format,
                                     out_features=layer.out_features, bias=layer.bias)
        g_ref = torch.autograd.grad(ref, params, gy)
        both_fused = ops._use_fused(x, layer.w_hat, "forward") and ops._use_fused(x, layer.w_hat, "backward")
    # one C++ autograd node where the fused kernels run both ways, else the Python autograd function
    assert ("FusedTrain" in lean.grad_fn.name()) == both_fused
    assert both_fused or type(lean.grad_fn).__name__ == "EagerSTLBackward"
    assert both_fused == (fused in ("on", "auto") and ops.native.load())
    assert torch.equal(lean, ref)
    for a, b in zip(g_lean, g_ref):
        assert torch.equal(a, b)


def test_lean_training_path_not_taken_where_a_check_or_mode_matters():
    layer = STLinear(16, 12, rank=8)
    x = torch.randn(2, 8, 16, requires_grad=True)
    lean = stlinear_mod._lean_operands
    assert lean(layer, x, training=True) is not None
    with torch.no_grad():
        assert lean(layer, x, training=True) is None  # the inference path's business
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean(layer, x, training=True) is None
    with row_mask(torch.ones(2, 8)):
        assert lean(layer, x, training=True) is None  # padding rows must be zeroed first
    assert lean(layer, x.double(), training=True) is None
    assert lean(layer, x[0], training=True) is None


def test_row_mask_still_zeroes_padding_in_training():
    """The padding safeguard holds with grad on: the padded batch's real rows and their gradients equal the
    unpadded sentence's; without the mask the padding leaks (the test can fail)."""
    torch.manual_seed(0)
    layer = STLinear(16, 12, rank=8)
    real = torch.randn(1, 6, 16)
    padded = torch.cat([real, torch.randn(1, 2, 16) * 100], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 2])
    alone = layer(real)
    with row_mask(mask):
        batched = layer(padded)
    leaky = layer(padded)
    assert torch.allclose(batched[:, :6], alone, atol=1e-5)
    assert not torch.allclose(leaky[:, 4:6], alone[:, 4:6], atol=1e-3)
    (g_alone,) = torch.autograd.grad(alone.sum(), layer.w_hat)
    (g_batched,) = torch.autograd.grad(batched[:, :6].sum(), layer.w_hat)
    assert torch.allclose(g_alone, g_batched, atol=1e-4)
