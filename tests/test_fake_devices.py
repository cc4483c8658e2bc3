"""GPU bugs caught without a GPU: STLinear and the SPN layers traced on fake CUDA and on meta tensors.

- Fake CUDA tensors (``FakeTensor`` with device cuda:0, no CUDA build needed) run every forward path,
  and the STL custom op's own implementation and hand-written backward, under a ``TorchDispatchMode``
  that records every op: a host read (``.item()``, ``.tolist()``, ``int(t)``: all
  ``aten._local_scalar_dense``), a ``.cpu()`` or any op that creates a CPU tensor fails the test.
- Autograd backward cannot run on fake CUDA tensors in a CPU-only build (the engine asks for a CUDA
  device guard and the process aborts), so whole forward + backward passes through the autograd engine
  are traced on the meta device instead, under the same recorder.
- The CPU cache heuristic of the pure-PyTorch path (row blocks, one ``mm`` each) must not split the
  encode on a GPU: counted on fake CUDA against the CPU.
"""

import contextlib
import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from strassenkit import SPNBilinear, SPNConv2d, SPNLinear, STLinear, set_phase
from strassenkit.functional import ops
from strassenkit.nn.spn import PHASES

CUDA = torch.device("cuda", 0)


class DeviceRecorder(TorchDispatchMode):
    """Records ops that read a tensor value on the host or produce a tensor off ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.host_reads, self.off_device, self.ops = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(func)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads.append(str(func))
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev) != self.device:  # recorded before a copy that may raise
            self.off_device.append(f"{func}(device={dev})")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.off_device.append(f"{func} -> {t.device}")
        return out

    def count(self, op) -> int:
        return sum(1 for f in self.ops if f is op)

    def assert_clean(self):
        assert self.host_reads == [], f"host reads: {self.host_reads}"
        assert self.off_device == [], f"tensors created off {self.device}: {self.off_device}"


class _NoCudaDeviceGuard(TorchFunctionMode):
    """Lets fake CUDA tensors through the few Python bindings that open a CUDA device guard.

    A CPU-only build has no CUDA guard, so e.g. ``Tensor.copy_`` and ``F.pad`` on fake CUDA tensors fail
    in the binding, before any kernel runs. The same aten op called directly (no binding) runs on fake
    tensors; only those calls are redirected, everything else runs unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
            name = getattr(func, "__name__", "")
            self.redirected.append(name)
            if name == "__getitem__":
                return _getitem(*args)
            if name == "__setitem__":  # t[index] = value: copy into the view
                t, index, value = args
                value = value if isinstance(value, torch.Tensor) else torch.ops.aten.scalar_tensor.default(value, dtype=t.dtype, device=t.device)
                torch.ops.aten.copy_.default(_getitem(t, index), value)
                return None
            if name == "batch_norm":  # F.batch_norm(input, mean, var, weight, bias, training, momentum, eps)
                b = inspect.signature(F.batch_norm).bind(*args, **kwargs)
                b.apply_defaults()
                a = b.arguments
                return torch.ops.aten.batch_norm(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                                                 a["training"], a["momentum"], a["eps"], False)
            aten = getattr(torch.ops.aten, name, None)
            if aten is None:
                raise
            return aten(*args, **kwargs)

    def __enter__(self):
        self.redirected = []
        return super().__enter__()


def _getitem(t: torch.Tensor, index):
    """Basic indexing (ints, slices, None, Ellipsis) with aten view ops."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        i = index.index(Ellipsis)
        fill = t.dim() - sum(1 for v in index if v is not None and v is not Ellipsis)
        index = index[:i] + (slice(None),) * fill + index[i + 1:]
    dim = 0
    for v in index:
        if v is None:
            t = torch.ops.aten.unsqueeze.default(t, dim)
            dim += 1
        elif isinstance(v, int):
            t = torch.ops.aten.select.int(t, dim, v)
        elif isinstance(v, slice):
            t = torch.ops.aten.slice.Tensor(t, dim, v.start, v.stop, v.step or 1)
            dim += 1
        else:
            raise TypeError(f"fake CUDA indexing supports ints, slices, None and ..., got {v!r}")
    return t


@contextlib.contextmanager
def fake_cuda_trace(mode: FakeTensorMode):
    """``with fake_cuda_trace(mode) as rec:`` run code on fake CUDA tensors, recording every op."""
    with mode, _NoCudaDeviceGuard(), DeviceRecorder(CUDA) as rec:
        yield rec


def _fake_cuda(mode: FakeTensorMode, t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    f = FakeTensor(mode, torch.empty(t.shape, dtype=t.dtype, device="meta"), CUDA)
    return f.requires_grad_(requires_grad)


def _state(module: torch.nn.Module, mode: FakeTensorMode, dtype=None) -> dict:
    """The module's parameters and buffers as fake CUDA tensors (no grad: see the module docstring)."""
    out = {}
    for k, v in list(module.named_parameters()) + list(module.named_buffers()):
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = _fake_cuda(mode, v)
    return out


def _spn_layers():
    torch.manual_seed(0)
    return [
        (SPNLinear(12, 8, rank=6), (torch.randn(2, 5, 12),)),
        (SPNLinear(12, 8, rank=6, norm="batch"), (torch.randn(6, 12),)),
        (SPNConv2d(3, 4, 3, 1, 1, rank=6, out_patch=2, norm="batch"), (torch.randn(2, 3, 6, 6),)),
        (SPNBilinear(4, 4, 4, 7), (torch.randn(3, 4), torch.randn(3, 4))),
    ]


# ------------------------------------------------------------------ the recorder itself
def test_recorder_catches_host_reads_and_cpu_tensors():
    mode = FakeTensorMode()
    x = _fake_cuda(mode, torch.empty(3, 4))
    with mode:
        with DeviceRecorder(CUDA) as rec:
            (x * 2).sum(0)
        rec.assert_clean()
        with DeviceRecorder(CUDA) as rec:
            x.cpu()
            torch.zeros(3)  # a factory without device=: a CPU tensor
        flagged = " ".join(rec.off_device)
        assert "_to_copy" in flagged and "zeros" in flagged
        with DeviceRecorder(CUDA) as rec:
            with pytest.raises(Exception):  # fake tensors have no value: the read raises after being recorded
                x.sum().item()
        assert rec.host_reads
    with DeviceRecorder(torch.device("meta")) as rec:
        with pytest.raises(Exception):  # meta tensors have no value either
            torch.ones(2, device="meta").tolist()
    assert rec.off_device  # .tolist() copies to the CPU first
    with DeviceRecorder(torch.device("meta")) as rec:
        with pytest.raises(Exception):
            int(torch.ones(2, device="meta")[0])
    assert rec.host_reads


# ------------------------------------------------------------------ fake CUDA: forward of the modules
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_tile", [None, 1])
def test_stlinear_forward_on_fake_cuda(dtype, row_tile):
    layer = STLinear(20, 12, tile=4, rank=24, row_tile=row_tile)
    mode = FakeTensorMode()
    params = _state(layer, mode, dtype)
    x = _fake_cuda(mode, torch.empty(2, 7, 20, dtype=dtype))
    with fake_cuda_trace(mode) as rec:
        y = functional_call(layer, params, (x,))
    rec.assert_clean()
    assert y.device == CUDA and y.shape == (2, 7, 12) and y.dtype == dtype


@pytest.mark.parametrize("phase", PHASES)
def test_spn_layers_forward_on_fake_cuda_every_phase(phase):
    for layer, xs in _spn_layers():
        set_phase(layer, phase)
        # eval: BatchNorm's training-mode update copies into the running stats under a CUDA device guard
        # that a CPU-only build lacks (PyTorch's code, not ours); training mode is traced on meta below
        layer.eval()
        mode = FakeTensorMode()
        params = _state(layer, mode)
        fxs = tuple(_fake_cuda(mode, x) for x in xs)
        with fake_cuda_trace(mode) as rec:
            y = functional_call(layer, params, fxs)
        rec.assert_clean()
        assert y.device == CUDA and y.shape == layer(*xs).shape, type(layer).__name__


# ------------------------------------------------------------------ fake CUDA: the STL op's own kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stl_op_implementation_and_backward_on_fake_cuda(dtype):
    """The real implementation of ``strassenkit::stl_forward`` and its backward (called directly: under
    FakeTensorMode the op itself would run its fake kernel), pure-PyTorch path."""
    n = m = p = 4
    B, M, K, N, r = 2, 9, 20, 12, 24
    mode = FakeTensorMode()
    x, w_hat, enc_x, dec, gy = (
        _fake_cuda(mode, torch.empty(*s, dtype=dtype))
        for s in ((B, M, K), (r, 5, 3), (r, n * m), (n * p, r), (B, M, N))
    )
    with ops.backend("torch"), fake_cuda_trace(mode) as rec:
        y, x_hat, prod = ops._forward_impl(x, w_hat, enc_x, dec, n, m, p, N)
        ctx = SimpleNamespace(saved_tensors=(x, w_hat, enc_x, dec, x_hat, prod), fmt=(n, m, p),
                              needs_input_grad=(True, True, True, True, False, False, False, False))
        with torch.no_grad():
            gx, gw, ge, gd, *_ = ops._backward(ctx, gy, None, None)
    rec.assert_clean()
    assert y.shape == (B, M, N) and y.dtype == dtype
    assert x_hat.dtype == dtype  # bf16 computes in bf16 on a GPU (no float32 detour as on AVX2 CPUs)
    for g, ref in ((gx, x), (gw, w_hat), (ge, enc_x), (gd, dec)):
        assert g.device == CUDA and g.shape == ref.shape and g.dtype == ref.dtype


def test_cpu_cache_blocks_only_on_cpu(monkeypatch):
    """An (8, 512, 1024) encode is 32 row-block mm calls on one CPU thread and one mm on a GPU."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    shape, r, t = (8, 512, 1024), 24, 4
    enc = torch.randn(r, t * t)
    with ops.backend("torch"):
        with DeviceRecorder(torch.device("cpu")) as rec:
            ops._encode(torch.randn(*shape), enc, t, t, 512 // t, 1024 // t)
        assert rec.count(torch.ops.aten.mm.out) == 32
        mode = FakeTensorMode()
        x, e = _fake_cuda(mode, torch.empty(*shape)), _fake_cuda(mode, enc)
        with fake_cuda_trace(mode) as rec:
            ops._encode(x, e, t, t, 512 // t, 1024 // t)
        rec.assert_clean()
        assert rec.count(torch.ops.aten.mm.out) == 1


# ------------------------------------------------------------------ meta: forward + backward through autograd
META = torch.device("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stlinear_forward_backward_on_meta(dtype):
    layer = STLinear(20, 12, tile=4, rank=24).to(device="meta", dtype=dtype)
    x = torch.empty(2, 7, 20, device="meta", dtype=dtype, requires_grad=True)
    with DeviceRecorder(META) as rec:
        y = layer(x)
        y.sum().backward()
    rec.assert_clean()
    assert y.shape == (2, 7, 12) and x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.is_meta for p in layer.parameters())


@pytest.mark.parametrize("phase", ["full", "ternary", "ternary_c", "frozen"])
def test_spn_layers_forward_backward_on_meta(phase):
    for layer, xs in _spn_layers():
        set_phase(layer, phase)
        layer.to("meta")
        mxs = tuple(torch.empty(x.shape, device="meta", requires_grad=True) for x in xs)
        with DeviceRecorder(META) as rec:
            y = layer(*mxs)
            y.sum().backward()
        rec.assert_clean()
        assert all(x.grad is not None and x.grad.is_meta for x in mxs)
        trainable = [p for p in layer.parameters() if p.requires_grad]
        assert trainable or (phase == "frozen" and isinstance(layer, SPNBilinear))  # frozen bilinear: nothing trains
        assert all(p.grad is not None and p.grad.is_meta for p in trainable)


# --------------------------------------------------------------------------- calibration on the layer's device
def test_calibration_statistics_and_solves_stay_on_the_layers_device(monkeypatch):
    """calibrate_'s streamed statistics (TileStats) and every least-squares step (w_hat, D, E_x, product
    scores of reduce_rank_) allocate on the device of their inputs: on fake CUDA no op creates a CPU
    tensor. (The solve's host reads, the ridge scale and Cholesky's info flag, are replaced by a plain
    solve here: fake tensors have no values.)"""
    from strassenkit.surgery import calibrate as cal
    from strassenkit.surgery import reduce_rank as rr

    def solve(G, H, ridge, inplace=False):
        return torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), H)

    monkeypatch.setattr(cal, "_solve", solve)
    monkeypatch.setattr(rr, "_solve", solve, raising=False)
    n = t = 4
    K, N, r = 24, 20, 7  # N not a multiple of t: two column groups
    Kt = K // t
    mode = FakeTensorMode()
    with fake_cuda_trace(mode) as rec:
        st = cal.TileStats.empty(K, N, n, t, torch.float32, device=CUDA)
        assert st.C.device == CUDA
        # S as streamed batches would leave it: one Gram per number of real rows in a tile
        st.S = cal._Grams({4: torch.ops.aten.randn.default([n * t * Kt, n * t * Kt], dtype=torch.float32,
                                                             device=CUDA),
                           2: torch.ops.aten.randn.default([2 * t * Kt, 2 * t * Kt], dtype=torch.float32, device=CUDA)})
        st.tiles = {4: 100, 2: 10}
        W = torch.ops.aten.randn.default([N, K], dtype=torch.float64, device=CUDA)
        st.set_dense_target(W)
        enc = torch.ops.aten.randn.default([r, n * t], dtype=torch.float32, device=CUDA)
        dec = torch.ops.aten.randn.default([n * t, r], dtype=torch.float32, device=CUDA)
        w_hat = cal.fit_w_hat_stats(st, enc, dec, 1e-4)
        dec2 = cal.fit_dec_stats(st, enc, w_hat, 1e-4)
        enc2 = cal.fit_enc_x_stats(st, dec2, w_hat, 1e-4)
        score = rr.product_scores(st, enc2, w_hat, dec2, 1e-4, "energy")
        shared = st.copy_for_target()
    for name, out in (("C", st.C), ("yy", st.yy), ("w_hat", w_hat), ("dec", dec2), ("enc_x", enc2), ("scores", score),
                      ("shared C", shared.C)):
        assert out.device == CUDA, f"{name} on {out.device}"
    assert tuple(w_hat.shape) == (r, Kt, -(-N // t)) and tuple(dec2.shape) == (n * t, r) and tuple(enc2.shape) == (r, n * t)
    rec.assert_clean()


def test_calibration_keeps_the_statistics_where_the_layer_is(monkeypatch):
    """The driver builds each layer's statistics on that layer's device (and the dense target there)."""
    from torch import nn

    import strassenkit as sk
    from strassenkit.surgery import calibrate as cal

    seen = []
    real_empty = cal.TileStats.empty.__func__

    def spy(cls, *a, device=None, **kw):
        seen.append(device)
        return real_empty(cls, *a, device=device, **kw)

    monkeypatch.setattr(cal.TileStats, "empty", classmethod(spy))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=10), head=None)
    sk.calibrate_(model, [torch.randn(4, 32, 16) for _ in range(2)], progress=False)
    assert len(seen) == 2 and all(torch.device(d) == torch.device("cpu") for d in seen), seen
