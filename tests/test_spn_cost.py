"""Cost counters of SPN layers against hand counts."""

import torch

from strassenkit import SPNConv2d, SPNLinear, set_phase
from strassenkit.cost import count


def _linear():
    layer = SPNLinear(4, 3, rank=2, quantizer="fixed")  # threshold 0.5, scale 1
    with torch.no_grad():
        layer.w_b.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.2], [0.9, 0.0, 0.0, 1.0]]))  # ternary: [[1,-1,0,0],[1,0,0,1]]
        layer.w_c.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 0.0]]))
    return layer


def test_spn_linear_hand_count():
    layer = _linear()
    set_phase(layer, "ternary")
    row = count(layer, torch.randn(5, 4)).layers[0]
    # 5 rows: a_hat products 2 per row; W_b rows have 2 and 2 non-zeros -> 2 adds; W_c rows 1, 2, 0 -> 1 add; bias 3
    assert row.kind == "spn_linear"
    assert row.mults == 2 * 5
    assert row.adds == (2 + 1) * 5 + 3 * 5
    assert row.macs_core == 10 and row.macs_encode == 2 * 4 * 5 and row.macs_decode == 3 * 2 * 5
    assert row.dense_macs == 4 * 3 * 5
    assert row.extra["mult_reduction"] == 4 * 3 / 2
    # full precision: W_b has two entries not in {0, +-1} (0.2, 0.9) -> 2 mults per row, and more additions
    set_phase(layer, "full")
    row = count(layer, torch.randn(5, 4)).layers[0]
    assert row.mults == 2 * 5 + 2 * 5
    assert row.adds == (1 + 2 + 1) * 5 + 3 * 5


def test_scales_are_counted_once_per_forward():
    layer = SPNLinear(4, 3, rank=2, quantizer="twn")
    set_phase(layer, "ternary")
    row = count(layer, torch.randn(7, 4)).layers[0]
    assert row.extra["scale_mults"] == 2 * 2  # W_b and W_c scales folded into a_hat: r each
    assert row.mults == 2 * 7 + 4


def test_spn_conv_hand_count():
    layer = SPNConv2d(2, 2, 1, 1, 0, rank=2, out_patch=2, bias=False, quantizer="fixed")
    with torch.no_grad():
        layer.w_b.fill_(1.0)  # (2, 2, 2, 2): each hidden unit sums 8 inputs -> 7 adds
        layer.w_c.fill_(1.0)  # (2, 2, 2, 2): each of the 2*2*2 outputs of a patch sums 2 units -> 1 add
    set_phase(layer, "ternary")
    row = count(layer, torch.randn(1, 2, 4, 4)).layers[0]
    patches = 4
    assert row.mults == 2 * patches
    assert row.adds == (2 * 7 + 8 * 1) * patches
    assert row.dense_macs == 2 * 16 * 2
    assert row.extra["mult_reduction"] == 2 * 2 * 1 * 4 / 2
    # odd output size: 5x5 output -> 3x3 patches (the patch grid is counted as executed)
    row = count(layer, torch.randn(1, 2, 5, 5)).layers[0]
    assert row.extra["patches"] == 9 and row.mults == 2 * 9
    # 3x3 kernel, 16 -> 32 channels, p = 2, r = 64: reduction 16*32*9*4/64
    big = SPNConv2d(16, 32, 3, 1, 1, rank=64, out_patch=2)
    assert count(big, torch.randn(1, 16, 8, 8)).layers[0].extra["mult_reduction"] == 16 * 32 * 9 * 4 / 64


def test_executed_macs_agree_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cases = [
        (SPNLinear(12, 7, rank=5), torch.randn(3, 4, 12)),
        (SPNConv2d(4, 6, 3, 2, 1, rank=8, out_patch=2, groups=2), torch.randn(2, 4, 9, 11)),
        (SPNConv2d(3, 5, 3, 1, 2, rank=6, out_patch=3), torch.randn(1, 3, 8, 7)),
    ]
    for layer, x in cases:
        row = count(layer, x).layers[0]
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            layer(x)
        # the flop counter counts the matmuls / convolutions (encode, decode), not the elementwise a_hat product
        assert fc.get_total_flops() == 2 * (row.macs_encode + row.macs_decode), type(layer).__name__


def test_per_channel_decoder_scales():
    from strassenkit.nn.quantize import TernaryQuantizer

    lin = SPNLinear(6, 5, rank=4, quantizer=TernaryQuantizer("twn", per_channel=True))
    set_phase(lin, "ternary")
    row = count(lin, torch.randn(3, 6)).layers[0]
    assert row.extra["scale_mults"] == 4 + 5 * 3  # W_b per hidden unit folds (r); W_c per output row: N per row
    conv = SPNConv2d(2, 3, 1, rank=4, quantizer=TernaryQuantizer("twn", per_channel=True))
    set_phase(conv, "ternary")
    assert count(conv, torch.randn(1, 2, 3, 3)).layers[0].extra["scale_mults"] == 4 + 4  # both per hidden unit
