import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from strassenkit import STLinear, cost
from strassenkit._models.vit import ViT


def _flops_by_op(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    counts = fc.get_flop_counts()["Global"]
    return {str(k).split(".")[-1]: v for k, v in counts.items()}, fc.get_total_flops()


def test_stl_core_flops_agree_with_flop_counter():
    layer = STLinear(37, 29, tile=4, rank=24)
    x = torch.randn(3, 10, 37)
    rep = cost.count(layer, x)
    (row,) = rep.layers
    by_op, total = _flops_by_op(lambda: layer(x))
    assert by_op["bmm"] == 2 * row.macs_core
    assert total == rep.flops == 2 * (row.macs_core + row.macs_encode + row.macs_decode)
    # hand count: L=10 -> 3 row tiles, K=37 -> 10, N=29 -> 8
    assert row.macs_core == 24 * 3 * 3 * 10 * 8
    assert row.macs_encode == 24 * 16 * 3 * 3 * 10
    assert row.dense_macs == 3 * 10 * 37 * 29


def test_ternary_codec_costs_additions_only():
    layer = STLinear.from_linear(nn.Linear(16, 16), "strassen_x_strassen")
    row = cost.count(layer, torch.randn(1, 4, 16)).layers[0]
    core_mults = row.macs_core
    assert row.mults == core_mults  # encoders/decoder are in {-1,0,1}: no multiplications
    random_layer = STLinear(16, 16, rank=49)
    row2 = cost.count(random_layer, torch.randn(1, 4, 16)).layers[0]
    assert row2.mults > core_mults


def test_matrix_op_cost_counts():
    m = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 0.0]])
    mults, adds = cost.matrix_op_cost(m, applications=10)
    assert mults == 20 and adds == 20


def test_model_report_matches_flop_counter():
    torch.manual_seed(0)
    model = ViT(dim=32, depth=1, make_linear=lambda i, o: STLinear(i, o))
    x = torch.randn(2, 8, 8)
    rep = cost.count(model, x)
    assert len(rep.layers) == 6  # patch_embed, qkv, proj, fc1, fc2, head
    by_op, _ = _flops_by_op(lambda: model(x))
    # the STL cores are the only bmm (CPU attention is not counted by FlopCounterMode); encode/decode are mm
    assert by_op["bmm"] == 2 * rep.total("macs_core")
    assert by_op["mm"] == 2 * (rep.total("macs_encode") + rep.total("macs_decode"))
    dense = ViT(dim=32, depth=1)
    drep = cost.count(dense, x)
    assert drep.dense_macs == rep.dense_macs
    assert rep.summary()["params"] == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("pos", "blocks.0.norm", "norm"))
    )
    assert "total" in rep.table()
