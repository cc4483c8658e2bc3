"""SPN layers: output shapes equal nn.Conv2d's, dense equivalents, from_linear/from_conv2d, errors."""

import itertools

import pytest
import torch
from torch import nn

from strassenkit import SPNBilinear, SPNConv2d, SPNLinear, set_phase
from strassenkit.algorithms import get
from strassenkit.nn.spn import DensePatchConv2d

D = torch.float64


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_conv_output_shapes_equal_nn_conv2d_over_a_grid():
    checked = 0
    for size, k, s, pad, p, g in itertools.product([(5, 5), (6, 7), (13, 10)], [1, 2, 3, 5], [1, 2, 3], [0, 1, "same"], [1, 2, 3], [1, 2]):
        if pad == "same" and s != 1:
            continue
        H, W = size
        ptot = 2 * pad if isinstance(pad, int) else 0
        if H + ptot < k or W + ptot < k:
            continue
        conv = nn.Conv2d(2, 2, k, s, pad, groups=g, bias=False)
        spn = SPNConv2d(2, 2, k, s, pad, rank=2, out_patch=p, groups=g)
        x = torch.randn(1, 2, H, W)
        with torch.no_grad():
            expected = conv(x).shape
            assert spn(x).shape == expected, (size, k, s, pad, p, g)
        assert spn.output_size(H, W) == tuple(expected[2:])
        checked += 1
    assert checked > 300


def test_conv_rectangular_kernel_stride_patch_shapes():
    for k, s, pad, p in [((3, 1), (2, 1), (1, 0), (2, 3)), ((1, 5), (1, 3), (0, 2), (3, 1)), (2, 1, "valid", 2)]:
        conv = nn.Conv2d(3, 5, k, s, pad)
        spn = SPNConv2d(3, 5, k, s, pad, rank=6, out_patch=p)
        x = torch.randn(2, 3, 11, 10)
        assert spn(x).shape == conv(x).shape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_linear_exact_and_to_dense(seed):
    torch.manual_seed(seed)
    lin = nn.Linear(12, 7).double()
    layer = SPNLinear.from_linear(lin)
    x = torch.randn(5, 3, 12, dtype=D)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-12, atol=1e-12)
    assert layer.rank == 7
    # rank larger than the matrix rank: extra units start with a_hat = 0, still exact
    big = SPNLinear.from_linear(lin, rank=10)
    torch.testing.assert_close(big(x), lin(x), rtol=1e-12, atol=1e-12)
    # truncated rank is an approximation (error > 0), the check can fail
    assert (SPNLinear.from_linear(lin, rank=3)(x) - lin(x)).abs().max() > 1e-3


@pytest.mark.parametrize("phase", ["full", "ternary", "ternary_b", "ternary_c", "frozen"])
@pytest.mark.parametrize("norm", [None, "batch"])
def test_linear_to_dense_equals_layer_float64(phase, norm):
    torch.manual_seed(3)
    layer = SPNLinear(9, 5, rank=6, norm=norm).double()
    with torch.no_grad():
        layer.a_hat.normal_()
        layer.bias.normal_()
    if norm:
        layer.train()
        for _ in range(3):
            layer(torch.randn(16, 9, dtype=D) * 2 + 1)  # move the running statistics
    layer.eval()
    set_phase(layer, phase)
    x = torch.randn(4, 9, dtype=D)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_conv_to_dense_equals_layer_float64(p):
    torch.manual_seed(p)
    layer = SPNConv2d(4, 6, 3, 2, 1, rank=8, out_patch=p, groups=2, norm="batch").double()
    with torch.no_grad():
        layer.a_hat.normal_()
        layer.bias.normal_()
    layer.train()
    layer(torch.randn(2, 4, 9, 9, dtype=D) + 0.5)
    layer.eval()
    x = torch.randn(2, 4, 9, 11, dtype=D)
    dense = layer.to_dense()
    if p == 1:
        assert isinstance(dense, nn.Conv2d)
    else:  # a random SPN with p > 1 is patch-periodic, not a convolution
        assert isinstance(dense, DensePatchConv2d)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("p,stride,pad,groups", [(1, 1, 1, 1), (2, 1, 1, 1), (2, 2, 0, 2), (3, 1, "same", 1)])
def test_from_conv2d_exact_and_back_to_conv2d(p, stride, pad, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride, pad, groups=groups).double()
    layer = SPNConv2d.from_conv2d(conv, out_patch=p)
    x = torch.randn(2, 4, 10, 9, dtype=D)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-11, atol=1e-11)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    torch.testing.assert_close(dense.weight, conv.weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense(x), conv(x), rtol=1e-11, atol=1e-11)


def test_bilinear_from_strassen_is_exact_in_ternary_phase():
    layer = SPNBilinear.from_algorithm(get("strassen"), quantizer="fixed", dtype=D)
    set_phase(layer, "ternary")
    A, B = torch.randn(50, 2, 2, dtype=D), torch.randn(50, 2, 2, dtype=D)
    torch.testing.assert_close(layer(A.reshape(50, 4), B.reshape(50, 4)).reshape(50, 2, 2), A @ B, rtol=1e-12, atol=1e-12)


def test_layers_train_forward_backward():
    torch.manual_seed(0)
    conv = SPNConv2d(3, 4, 3, 1, 1, rank=6, out_patch=2, norm="batch")
    lin = SPNLinear(8, 3, rank=5, norm="batch")
    for phase in ("full", "ternary"):
        set_phase(conv, phase)
        set_phase(lin, phase)
        conv(torch.randn(2, 3, 7, 7)).sum().backward()
        lin(torch.randn(4, 8)).sum().backward()
        for m in (conv, lin):
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rank is required"):
        SPNConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="divisible by groups"):
        SPNConv2d(3, 4, 3, rank=4, groups=2)
    with pytest.raises(ValueError, match="rank=5 must be divisible"):
        SPNConv2d(4, 4, 3, rank=5, groups=2)
    with pytest.raises(ValueError, match="padding='same'"):
        SPNConv2d(4, 4, 3, stride=2, padding="same", rank=4)
    with pytest.raises(ValueError, match="kernel_size"):
        SPNConv2d(4, 4, (3, 3, 3), rank=4)
    with pytest.raises(ValueError, match="expected input"):
        SPNConv2d(4, 4, 3, rank=4)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="in_features"):
        SPNLinear(0, 3, rank=2)
    with pytest.raises(ValueError, match="expected input"):
        SPNLinear(5, 3, rank=2)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="norm"):
        SPNLinear(5, 3, rank=2, norm="layer")
    with pytest.raises(ValueError, match="quantizer"):
        SPNLinear(5, 3, rank=2, quantizer="binary")
    with pytest.raises(ValueError, match="nn.Conv2d"):
        SPNConv2d.from_conv2d(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="dilation"):
        SPNConv2d.from_conv2d(nn.Conv2d(3, 3, 3, dilation=2))


def test_spn_linear_learns_a_dense_teacher_in_each_phase():
    torch.manual_seed(0)
    teacher = nn.Linear(8, 4)
    x = torch.randn(256, 8)
    y = teacher(x).detach()
    layer = SPNLinear(8, 4, rank=8)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    start = nn.functional.mse_loss(layer(x), y).item()
    losses = {}
    for phase in ("full", "ternary", "frozen"):
        set_phase(layer, phase)
        for _ in range(150):
            loss = nn.functional.mse_loss(layer(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[phase] = loss.item()
    assert losses["full"] < 0.01 * start  # rank 8 >= min(8, 4): the dense map is reachable
    assert losses["ternary"] < 0.5 * start and losses["frozen"] <= losses["ternary"] * 1.05
