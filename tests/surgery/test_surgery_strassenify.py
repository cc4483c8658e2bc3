import copy
import json
import warnings

import pytest
import torch
from torch import nn

from strassenkit import SPNConfig, STLConfig, STLinear, densify_, inspect_targets, strassenify_
from strassenkit.surgery import config_from_dict, config_from_json, is_causal_model


class Block(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def _types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, STLinear))}


def test_all_linear_skips_head_and_exact_init_matches_dense():
    m = _net()
    ref = copy.deepcopy(m)
    names = strassenify_(m, STLConfig(init="strassen_x_strassen", rank=None))
    assert names == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert isinstance(m.head, nn.Linear) and not isinstance(m.head, STLinear)
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-10)  # exact algorithm: same function


def test_head_none_converts_head_and_names_suffix_regex_exclude():
    m = _net()
    strassenify_(m, STLConfig(), head=None)
    assert isinstance(m.head, STLinear)
    m = _net()
    assert strassenify_(m, STLConfig(), targets=["fc1"]) == ["blocks.0.fc1", "blocks.1.fc1"]
    m = _net()
    assert strassenify_(m, STLConfig(), targets="re:blocks\\.1\\.fc.*") == ["blocks.1.fc1", "blocks.1.fc2"]
    m = _net()
    assert strassenify_(m, STLConfig(), exclude=["re:.*fc2", "blocks.0.fc1"]) == ["blocks.1.fc1"]
    m = _net()  # a named head is converted (it was asked for)
    assert strassenify_(m, STLConfig(), targets=["head"]) == ["head"]


def test_mapping_overrides_and_none_skips():
    m = _net()
    cfgs = {"blocks.0.fc1": STLConfig(tile=2, rank=7, init="strassen"), "re:.*fc1": STLConfig(rank=30), "blocks.1.fc2": None}
    names = strassenify_(m, None, targets=cfgs)
    assert names == ["blocks.0.fc1", "blocks.1.fc1"]
    assert (m.blocks[0].fc1.tile, m.blocks[0].fc1.rank) == (2, 7)  # exact name wins over the regex
    assert (m.blocks[1].fc1.tile, m.blocks[1].fc1.rank) == (4, 30)
    assert not isinstance(m.blocks[1].fc2, STLinear)


def test_failure_leaves_model_unchanged():
    m = _net()
    before = _types(m)
    # the second layer's config cannot be built (catalogue rank 49 != 24): nothing may be replaced
    bad = {"blocks.0.fc1": STLConfig(), "blocks.0.fc2": STLConfig(init="strassen_x_strassen", rank=24)}
    with pytest.raises(ValueError, match="blocks.0.fc2.*not changed"):
        strassenify_(m, None, targets=bad)
    assert _types(m) == before


def test_warnings_nothing_matched_and_unsupported():
    m = _net()
    with pytest.warns(UserWarning, match="matched no convertible module"):
        assert strassenify_(m, STLConfig(), targets=["nope"]) == []
    with pytest.warns(UserWarning, match="LayerNorm is not supported by STLConfig"):
        assert strassenify_(m, STLConfig(), targets=["blocks.0.norm", "blocks.0.fc1"]) == ["blocks.0.fc1"]
    mha = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        assert strassenify_(mha, STLConfig()) == ["1"]


def test_causal_forces_row_tile_one_or_raises():
    m = _net()
    strassenify_(m, STLConfig(), causal=True)
    assert all(layer.row_tile == 1 for layer in m.modules() if isinstance(layer, STLinear))
    with pytest.raises(ValueError, match="mixes 4 consecutive tokens"):
        strassenify_(_net(), STLConfig(row_tile=4), causal=True)

    class Cfg:
        is_decoder = True

    hf = _net()
    hf.config = Cfg()
    assert is_causal_model(hf)
    strassenify_(hf, STLConfig())
    assert hf.blocks[0].fc1.row_tile == 1
    # the row_tile=1 model really is causal: changing a later token never changes earlier outputs
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    torch.testing.assert_close(hf(x)[:, :5], hf(x2)[:, :5])
    # while a row_tile=4 model leaks within tiles
    leak = _net()
    strassenify_(leak, STLConfig())
    assert not torch.allclose(leak(x)[:, 4:5], leak(x2)[:, 4:5])


def test_inspect_targets_is_a_dry_run_with_costs():
    m = _net()
    before = _types(m)
    rep = inspect_targets(m, STLConfig(), targets="all-linear")
    assert _types(m) == before
    assert [r.name for r in rep.matched] == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert [(r.name, r.status) for r in rep.unmatched] == [("head", "head")]
    row = rep.matched[0]  # 16 -> 32, t=4, r=24, row_tile 4: core 24*4*8/4, encode 24*4*4, decode 24*4*8
    assert row.cost["dense_macs_per_row"] == 16 * 32
    assert row.cost["macs_per_row"] == 24 * 4 * 8 / 4 + 24 * 4 * 4 + 24 * 4 * 8
    assert "blocks.0.fc1" in rep.table()
    json.dumps(rep.to_dict())
    # example inputs: real costs; a 2-D input cannot go through row_tile=4 layers and is reported
    rep2 = inspect_targets(m, STLConfig(), example_inputs=(torch.randn(2, 8, 16, dtype=torch.float64),))
    assert rep2.example_error == "" and rep2.matched[0].cost["dense_macs"] == 2 * 8 * 16 * 32
    rep3 = inspect_targets(m, STLConfig(), example_inputs=(torch.randn(2, 16, dtype=torch.float64),))
    assert "row_tile=1" in rep3.example_error
    with pytest.warns(UserWarning, match="matched no"):
        inspect_targets(m, STLConfig(), targets="re:zzz")


def test_config_json_roundtrip_and_errors():
    for c in (STLConfig(tile=2, rank=7, init="strassen", row_tile=1), SPNConfig(rank_ratio=0.5, ternary=True)):
        assert config_from_json(c.to_json()) == c
        assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="version 2"):
        STLConfig(version=2)
    with pytest.raises(ValueError, match="no field"):
        config_from_dict({"type": "STLConfig", "tiles": 4})
    with pytest.raises(ValueError, match="at most one"):
        SPNConfig(rank=4, rank_ratio=0.5)
    with pytest.raises(ValueError, match="tile must be"):
        STLConfig(tile=0)


def test_spn_conversion_and_densify_roundtrip():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 10))
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3, 8, 8)
    names = strassenify_(m, SPNConfig())  # exact SVD rank by default
    assert names == ["0", "2", "4"]
    assert [type(m[i]).__name__ for i in (0, 2, 4, 6)] == ["SPNConv2d", "SPNConv2d", "SPNLinear", "Linear"]
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-4)
    assert densify_(m) == ["0", "2", "4"]
    assert all(type(mod) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten) for mod in m)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="groups"):
        strassenify_(copy.deepcopy(ref), SPNConfig(groups=4), targets=["2"])


def test_densify_stl_row_tile_one_and_keeps_row_mixing_layers():
    m = _net()
    strassenify_(m, {"blocks.0.fc1": STLConfig(row_tile=1), "blocks.0.fc2": STLConfig()})
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    y = m(x)
    with pytest.warns(UserWarning, match="no dense equivalent"):
        assert densify_(m) == ["blocks.0.fc1"]
    assert type(m.blocks[0].fc1) is nn.Linear and isinstance(m.blocks[0].fc2, STLinear)
    torch.testing.assert_close(m(x), y)
    with pytest.raises(ValueError, match="not changed"):
        densify_(m, strict=True)


def test_pattern_matching_a_container_converts_its_linear_children_quietly():
    m = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the Block containers themselves
        names = strassenify_(m, STLConfig(), targets="re:blocks\\.0(\\.fc.)?")
    assert names == ["blocks.0.fc1", "blocks.0.fc2"]
