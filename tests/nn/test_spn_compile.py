"""SPN layers without host syncs: the phase is a Python attribute, so forward reads no tensor value,
``torch.compile(fullgraph=True)`` traces every phase, and the phase still round-trips through the
state_dict (key ``spn_phase``, as before)."""

import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from strassenkit import SPNBilinear, SPNConv2d, SPNLinear, set_phase
from strassenkit.nn.spn import PHASES


def _layers():
    torch.manual_seed(0)
    return {
        "linear": (SPNLinear(12, 8, rank=6), (torch.randn(3, 12),)),
        "linear_bn": (SPNLinear(12, 8, rank=6, norm="batch"), (torch.randn(5, 12),)),
        "conv_bn": (SPNConv2d(3, 4, 3, 1, 1, rank=6, out_patch=2, norm="batch"), (torch.randn(2, 3, 6, 6),)),
        "bilinear": (SPNBilinear(4, 4, 4, 7, quantizer="fixed"), (torch.randn(3, 4), torch.randn(3, 4))),
    }


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class _ScalarReads(TorchDispatchMode):
    """Records every op that copies a tensor value to the host (``.item()``, ``int(t)``, ``bool(t)``)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", ["linear", "linear_bn", "conv_bn", "bilinear"])
def test_compile_fullgraph_every_phase(kind, phase):
    layer, xs = _layers()[kind]
    set_phase(layer, phase)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xs_c = tuple(x.clone().requires_grad_(True) for x in xs)
    xs_e = tuple(x.clone().requires_grad_(True) for x in xs)
    y_c, y_e = compiled(*xs_c), layer(*xs_e)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    y_c.square().sum().backward()
    grads_c = [x.grad for x in xs_c] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    y_e.square().sum().backward()
    grads_e = [x.grad for x in xs_e] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    assert len(grads_c) == len(grads_e) > 1
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_compiled_layer_follows_phase_switch_and_does_not_recompile_per_step():
    layer, (x,) = _layers()["linear"]
    torch._dynamo.reset()
    backend = _CountingBackend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    for _ in range(3):
        compiled(x)
    assert backend.graphs == 1  # no recompilation while the phase stays the same
    set_phase(layer, "ternary")
    y = compiled(x)
    assert backend.graphs == 2  # the phase is guarded on: one recompilation
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    full = SPNLinear(12, 8, rank=6)
    full.load_state_dict(layer.state_dict())
    set_phase(full, "full")
    assert (y - full(x)).abs().max() > 1e-4  # the ternary output really differs from the full one


@pytest.mark.parametrize("kind", ["linear_bn", "conv_bn", "bilinear"])
@pytest.mark.parametrize("phase", ["ternary", "frozen"])
def test_forward_reads_no_tensor_value_on_the_host(kind, phase):
    layer, xs = _layers()[kind]
    set_phase(layer, phase)
    with _ScalarReads() as mode:
        layer(*xs)
    assert mode.reads == []
    with _ScalarReads() as mode:  # the mode does see host reads
        int(layer.spn_phase)
    assert len(mode.reads) == 1


@pytest.mark.parametrize("phase", ["ternary_b", "frozen"])
def test_phase_round_trips_through_state_dict_key_spn_phase(phase):
    layer, (x,) = _layers()["linear"]
    set_phase(layer, phase)
    sd = layer.state_dict()
    assert sd["spn_phase"].dtype == torch.int8 and int(sd["spn_phase"]) == PHASES.index(phase)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = SPNLinear(12, 8, rank=6)
    assert fresh.phase == "full"
    fresh.load_state_dict(torch.load(buf))
    assert fresh.phase == phase and fresh.w_b.requires_grad == (phase != "frozen")
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    # a checkpoint written before this change (only the buffer, same key) loads the same way
    old = {k: v.clone() for k, v in sd.items()}
    other = SPNLinear(12, 8, rank=6)
    other.load_state_dict(old)
    assert other.phase == phase
    bad = dict(old, spn_phase=torch.tensor(9, dtype=torch.int8))
    with pytest.raises(ValueError, match="not a phase index"):
        SPNLinear(12, 8, rank=6).load_state_dict(bad)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_phase_buffer_is_created_on_the_requested_device(device):
    for layer in (
        SPNLinear(12, 8, rank=6, norm="batch", device=device),
        SPNConv2d(3, 4, 3, rank=6, device=device),
        SPNBilinear(4, 4, 4, 7, device=device),
    ):
        assert {b.device.type for b in layer.buffers()} == {device}
        assert {p.device.type for p in layer.parameters()} == {device}
        layer.set_phase("ternary")  # writing the buffer works on the device (meta: a no-op)
        assert layer.phase == "ternary"


def test_meta_layer_loads_a_real_state_dict_with_assign():
    src, (x,) = _layers()["linear"]
    set_phase(src, "ternary_c")
    with torch.device("meta"):
        dst = SPNLinear(12, 8, rank=6)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.phase == "ternary_c" and dst.spn_phase.device.type == "cpu"
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
