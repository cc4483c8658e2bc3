"""FSDP2 units: the transformer blocks are sharded as units of their own (innermost first), and a sharded model
computes what the unsharded one does (a 1-process gloo group on the CPU; the 2-process run with kill -9 and
resume is in test_train_fsdp.py)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import strassenkit as sk
from strassenkit._models.vit import ViT
from strassenkit.train.sharded import fsdp_units, shard_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _stl_vit():
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=2, dim=32, depth=3, heads=4)
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=8))
    return model


def test_units_are_the_blocks_innermost_first():
    model = _stl_vit()
    assert fsdp_units(model) == list(model.blocks)[::-1]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert fsdp_units(mlp) == []  # no blocks: the whole model is one unit, as before

    class Nested(nn.Module):  # blocks inside blocks: the inner ones must be sharded first
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]) for _ in range(2))
            self.free = nn.ModuleList([nn.ReLU()])  # no parameters: not a unit

    n = Nested()
    units = fsdp_units(n)
    pos = {id(u): i for i, u in enumerate(units)}
    for outer in n.layers:
        assert all(pos[id(inner)] < pos[id(outer)] for inner in outer)
    assert not any(isinstance(u, nn.ReLU) for u in units)


def test_units_of_hugging_face_models_follow_no_split_modules():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=100)
    model = transformers.BertModel(cfg)
    names = [type(u).__name__ for u in fsdp_units(model)]
    assert sorted(names) == ["BertEmbeddings", "BertLayer", "BertLayer"]


def test_sharded_blocks_compute_what_the_unsharded_model_does(tmp_path):
    from torch.distributed.fsdp import FSDPModule

    model = _stl_vit()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 8, 8), torch.tensor([0, 1, 2, 3])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard_model(model)
        assert all(isinstance(b, FSDPModule) for b in model.blocks) and isinstance(model, FSDPModule)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        loss_ref = nn.functional.cross_entropy(ref(x), y)
        loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()
