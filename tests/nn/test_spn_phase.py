"""Training phases: what is ternary, freezing, save/load of the phase, int8 export round trip."""

import io

import pytest
import torch
from torch import nn

from strassenkit import SPNBilinear, SPNConv2d, SPNLinear, set_phase
from strassenkit.nn.phase import export_ternary, get_phases, import_ternary


def _model(quantizer="twn"):
    torch.manual_seed(0)
    return nn.Sequential(
        SPNConv2d(3, 4, 3, 1, 1, rank=6, out_patch=2, quantizer=quantizer),
        nn.ReLU(),
        nn.Flatten(),
        SPNLinear(4 * 6 * 6, 5, rank=8, quantizer=quantizer),
    )


def _is_scaled_ternary(w):
    vals = w.detach().abs().unique()
    vals = vals[vals > 0]
    return len(vals) <= 1


@pytest.mark.parametrize("phase,ternary", [("full", set()), ("ternary", {"w_b", "w_c"}), ("ternary_b", {"w_b"}), ("ternary_c", {"w_c"}), ("frozen", {"w_b", "w_c"})])
def test_which_matrices_are_ternary(phase, ternary):
    m = _model()
    assert set_phase(m, phase) == 2
    for layer in (m[0], m[3]):
        for name in ("w_b", "w_c"):
            eff = layer.effective(name)
            assert _is_scaled_ternary(eff) == (name in ternary)
            if name not in ternary:
                assert eff is getattr(layer, name)


def test_frozen_phase_trains_only_a_hat_and_bias():
    m = _model()
    set_phase(m, "frozen")
    x = torch.randn(2, 3, 6, 6)
    m(x).sum().backward()
    for layer in (m[0], m[3]):
        assert not layer.w_b.requires_grad and layer.w_b.grad is None and layer.w_c.grad is None
        assert layer.a_hat.grad is not None and layer.bias.grad is not None
    # even if someone re-enables requires_grad, frozen matrices get no gradient
    m[3].w_b.requires_grad_(True)
    m(x).sum().backward()
    assert m[3].w_b.grad is None
    set_phase(m, "ternary")
    assert m[3].w_b.requires_grad
    m(x).sum().backward()
    assert m[3].w_b.grad is not None  # straight-through gradient in the ternary phase


@pytest.mark.parametrize("phase", ["ternary_c", "frozen"])
def test_phase_survives_state_dict_save_load(phase):
    m = _model()
    set_phase(m, phase)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    torch.manual_seed(1)
    for p in fresh.parameters():
        p.data.normal_()
    assert set(get_phases(fresh).values()) == {"full"}
    fresh.load_state_dict(torch.load(buf))
    assert set(get_phases(fresh).values()) == {phase}
    assert fresh[3].w_b.requires_grad == (phase != "frozen")
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("quantizer", ["twn", "fixed"])
def test_int8_export_round_trip(quantizer):
    m = _model(quantizer)
    set_phase(m, "ternary")
    exported = export_ternary(m)
    assert set(exported) == {"0.w_b", "0.w_c", "3.w_b", "3.w_c"}
    for entry in exported.values():
        assert entry["values"].dtype == torch.int8
        assert set(entry["values"].unique().tolist()) <= {-1, 0, 1}
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    other = _model(quantizer)
    torch.manual_seed(5)
    for p in other.parameters():
        p.data.normal_()
    other.load_state_dict({k: v for k, v in m.state_dict().items() if "w_b" not in k and "w_c" not in k}, strict=False)
    assert (other(x) - y).abs().max() > 1e-3  # different ternary matrices before the import
    import_ternary(other, exported)
    torch.testing.assert_close(other(x), y, rtol=1e-6, atol=1e-6)
    again = export_ternary(other)
    for k in exported:
        assert torch.equal(again[k]["values"], exported[k]["values"])
        torch.testing.assert_close(again[k]["scale"], exported[k]["scale"])


def test_bilinear_encoders_are_w_a_and_w_b():
    layer = SPNBilinear(4, 4, 4, 7)
    set_phase(layer, "ternary_b")
    assert _is_scaled_ternary(layer.effective("w_a")) and _is_scaled_ternary(layer.effective("w_b"))
    assert not _is_scaled_ternary(layer.effective("w_c"))
    assert set(export_ternary(layer)) == {"w_a", "w_b", "w_c"}


def test_errors():
    with pytest.raises(ValueError, match="phase must be one of"):
        set_phase(_model(), "half")
    with pytest.raises(ValueError, match="no SPN layer"):
        set_phase(nn.Linear(3, 3), "ternary")
    m = _model()
    ex = export_ternary(m)
    with pytest.raises(KeyError, match="missing"):
        import_ternary(m, {k: v for k, v in ex.items() if k != "3.w_c"})
    bad = dict(ex)
    bad["3.w_c"] = {"values": ex["3.w_c"]["values"].to(torch.int32), "scale": ex["3.w_c"]["scale"]}
    with pytest.raises(ValueError, match="int8"):
        import_ternary(m, bad)
