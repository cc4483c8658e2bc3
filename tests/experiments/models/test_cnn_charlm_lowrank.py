import pytest
import torch

from strassenkit.nn.phase import set_phase
from strassenkit.nn.spn import SPNConv2d, SPNLinear

from experiments.models.charlm import CharLSTM
from experiments.models.cnn import ResNetSmall
from experiments.models.lowrank import LowRankLinear, matched_rank


def test_resnet_small_shapes_dense_and_spn():
    x = torch.rand(3, 28, 28)
    assert ResNetSmall(4)(x).shape == (3, 10)
    make = lambda ci, co, s: SPNConv2d(ci, co, 3, s, 1, rank=co, out_patch=2, bias=False)  # noqa: E731
    m = ResNetSmall(4, make_conv=make)
    assert sum(isinstance(mod, SPNConv2d) for mod in m.modules()) == 5
    set_phase(m, "ternary")
    assert m(x).shape == (3, 10)
    with pytest.raises(ValueError, match="expected images"):
        m(torch.rand(3, 2, 28, 28))


@pytest.mark.parametrize("phase", ["full", "ternary"])
def test_charlstm_fast_recurrence_matches_module_call(phase):
    """The recurrent fast path (effective matrices computed once) must equal calling the SPN layer."""
    torch.manual_seed(0)
    m = CharLSTM(11, 6, 8, make_linear=lambda i, o: SPNLinear(i, o, rank=5))
    set_phase(m, phase)
    ids = torch.randint(0, 11, (2, 7))
    fast, (h, c) = m(ids)
    m._recurrent_fn = lambda: m.gates_rec  # slow reference: the module itself at every step
    ref, (h2, c2) = m(ids)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(h, h2)
    assert fast.shape == (2, 7, 11)


def test_charlstm_state_carry_equals_full_sequence():
    torch.manual_seed(0)
    m = CharLSTM(9, 4, 6)
    ids = torch.randint(0, 9, (2, 10))
    full, _ = m(ids)
    a, st = m(ids[:, :4])
    b, _ = m(ids[:, 4:], st)
    torch.testing.assert_close(torch.cat([a, b], 1), full)


def test_lowrank_linear_and_matched_rank():
    m = LowRankLinear(12, 20, rank=3)
    assert m(torch.rand(2, 5, 12)).shape == (2, 5, 20)
    assert int(torch.linalg.matrix_rank(m[1].weight @ m[0].weight, atol=1e-5)) == 3
    assert matched_rank(12, 20, 3 * 32) == 3
    assert matched_rank(12, 20, 1) == 1
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, rank=0)
