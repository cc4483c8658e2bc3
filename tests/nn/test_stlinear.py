import io

import pytest
import torch
from torch import nn

from strassenkit import STLinear
from strassenkit.algorithms import get


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("init", ["strassen_x_strassen", "strassen_x_winograd", "strassen", "laderman", "strassen_4x2x2"])
def test_from_linear_exact_in_float64(init):
    torch.manual_seed(0)
    lin = nn.Linear(37, 29).double()
    layer = STLinear.from_linear(lin, init)
    x = torch.randn(3, 10, 37, dtype=torch.float64)
    assert _rel(layer(x), lin(x)) <= 1e-12
    alg = get(init)
    assert layer.format == alg.format and layer.rank == alg.rank


def test_learned_parameters_and_shapes():
    layer = STLinear(30, 21, tile=4, rank=24)
    names = dict(layer.named_parameters())
    assert set(names) == {"w_hat", "enc_x", "dec", "bias"}
    assert names["w_hat"].shape == (24, 8, 6)  # (r, ceil(K/t), ceil(N/t))
    assert names["enc_x"].shape == (24, 16) and names["dec"].shape == (16, 24)
    assert "enc_w" in dict(layer.named_buffers())
    assert STLinear(30, 21, bias=False).bias is None


def test_extra_repr_reports_factors():
    text = repr(STLinear(64, 64, tile=4, rank=24))
    assert "tile=4" in text and "rank=24" in text
    assert "flop_factor=2.67x" in text and "param_factor=1.50x" in text


def test_random_init_preserves_output_variance():
    torch.manual_seed(0)
    x = torch.randn(64, 32, 256)
    var_dense = torch.stack([nn.Linear(256, 256)(x).var() for _ in range(8)]).mean()
    var_stl = torch.stack([STLinear(256, 256, seed=s)(x).var() for s in range(8)]).mean()
    assert 0.7 < (var_stl / var_dense).item() < 1.4


def test_batch_independence_and_sequence_padding():
    """Changing sample j never changes sample i, even with padding of L and a non-exact codec."""
    torch.manual_seed(0)
    layer = STLinear(12, 10, tile=4, rank=24)
    x = torch.randn(4, 7, 12)  # L=7 is padded to 8 per sample
    y = layer(x)
    for j in range(4):
        x2 = x.clone()
        x2[j] = torch.randn(7, 12) * 10
        y2 = layer(x2)
        for i in range(4):
            if i != j:
                assert torch.equal(y[i], y2[i])
        assert not torch.allclose(y[j], y2[j])
    # extra leading dims (batch, heads, L, K) are independent matrices too
    x4 = torch.randn(2, 3, 5, 12)
    y4 = layer(x4)
    x4b = x4.clone()
    x4b[1, 2] += 1
    y4b = layer(x4b)
    assert torch.equal(y4[0], y4b[0]) and torch.equal(y4[1, :2], y4b[1, :2])


def test_two_dim_input_needs_row_tile_1():
    layer = STLinear(12, 10, tile=4, rank=24)
    with pytest.raises(ValueError, match="row_tile=1"):
        layer(torch.randn(8, 12))
    strip = STLinear(12, 10, tile=4, rank=12, row_tile=1)
    x = torch.randn(8, 12)
    y = strip(x)
    assert y.shape == (8, 10)
    x2 = x.clone()
    x2[3] += 5
    y2 = strip(x2)
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    assert torch.equal(y[mask], y2[mask])  # rows never mix with row_tile=1
    assert strip(torch.randn(12)).shape == (10,)


def test_row_tile_1_is_causal_safe_along_sequence():
    layer = STLinear(8, 8, tile=4, rank=10, row_tile=1)
    x = torch.randn(2, 9, 8)
    y = layer(x)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 4, 8)  # change the future
    assert torch.equal(layer(x2)[:, :5], y[:, :5])


def test_row_tile_4_does_mix_rows_inside_a_tile():
    layer = STLinear(8, 8, tile=4, rank=10)
    x = torch.randn(1, 8, 8)
    x2 = x.clone()
    x2[0, 3] += 1
    assert not torch.allclose(layer(x)[0, 0], layer(x2)[0, 0])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = STLinear(20, 13, tile=4, rank=24)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = STLinear(20, 13, tile=4, rank=24, seed=99)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(2, 6, 20)
    assert torch.equal(a(x), b(x))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_training_reduces_loss_and_gradients_reach_codec():
    torch.manual_seed(0)
    layer = STLinear(16, 16, tile=4, rank=24)
    target = nn.Linear(16, 16)
    x = torch.randn(32, 8, 16)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert layer.enc_x.grad is not None and layer.dec.grad.abs().sum() > 0


def test_autocast_bf16():
    layer = STLinear(32, 32)
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), layer(x)) < 5e-2


def test_clear_errors():
    with pytest.raises(ValueError, match="tile must be"):
        STLinear(8, 8, tile=0)
    with pytest.raises(ValueError, match="rank must be"):
        STLinear(8, 8, rank=0)
    with pytest.raises(ValueError, match="row_tile"):
        STLinear(8, 8, row_tile=0)
    with pytest.raises(ValueError, match="rank 49 but the layer was built with rank=24"):
        STLinear(8, 8, tile=4, rank=24, init="strassen_x_strassen")
    with pytest.raises(ValueError, match=r"<2,2,2> tiles but the layer needs"):
        STLinear(8, 8, tile=4, rank=7, init="strassen")
    with pytest.raises(ValueError, match="neither an approximation family"):
        STLinear(8, 8, init="bogus")
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        STLinear.from_linear(lin, "strassen")
    with pytest.raises(TypeError, match="nn.Linear"):
        STLinear.from_linear(nn.Conv2d(1, 1, 1), "strassen")
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 8\)"):
        STLinear(8, 8)(torch.randn(2, 4, 9))
