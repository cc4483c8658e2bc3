"""The fast STL path (strassenkit::stl_forward custom op) against the einsum reference, incl. gradients."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strassenkit.functional.ops as ops
from strassenkit.functional import stl_apply, stl_apply_reference, stl_matmul
from strassenkit.nn import STLinear

FORMATS = [(4, 4, 4), (2, 2, 2), (1, 4, 4), (2, 3, 4), (3, 2, 1), (4, 1, 3)]


def _operands(lead, M, K, N, fmt, r, dtype=torch.float64, seed=0, grad=False):
    n, m, p = fmt
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)  # noqa: E731
    return mk(*lead, M, K), mk(r, -(-K // m), -(-N // p)), mk(r, n * m), mk(n * p, r)


def _grads(fn, ops_, fmt, N, gy):
    y = fn(*ops_, fmt, N)
    return (y, *torch.autograd.grad(y, ops_, gy))


@pytest.fixture(params=[ops._CHUNK_COLS, 5], ids=["default-blocks", "tiny-blocks"])
def chunk(request, monkeypatch):
    """Run with the default cache blocks and with 5-column blocks (many ragged blocks)."""
    monkeypatch.setattr(ops, "_CHUNK_COLS", request.param)
    return request.param


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    M=st.integers(1, 11), K=st.integers(1, 13), N=st.integers(1, 13),
    fmt=st.sampled_from(FORMATS), r=st.integers(1, 9), seed=st.integers(0, 2**16),
)
def test_fast_matches_reference_forward_and_grads_float64(lead, M, K, N, fmt, r, seed):
    for cols in (ops._CHUNK_COLS, 3):  # whole-tensor blocks and many small ragged blocks
        old, ops._CHUNK_COLS = ops._CHUNK_COLS, cols
        try:
            args = _operands(lead, M, K, N, fmt, r, seed=seed, grad=True)
            gy = torch.randn(*lead, M, N, dtype=torch.float64)
            fast = _grads(stl_apply, args, fmt, N, gy)
            ref = _grads(stl_apply_reference, args, fmt, N, gy)
        finally:
            ops._CHUNK_COLS = old
        assert fast[0].shape == (*lead, M, N)
        for name, a, b in zip(("y", "x", "w_hat", "enc_x", "dec"), fast, ref):
            assert a.shape == b.shape, name
            scale = b.abs().max().clamp(min=1.0)
            assert (a - b).abs().max() / scale <= 1e-12, (name, cols)


@pytest.mark.parametrize("fmt,shape", [((4, 4, 4), ((2,), 5, 6, 7)), ((2, 3, 4), ((), 3, 5, 6)), ((1, 4, 4), ((2, 1), 1, 3, 9))])
def test_gradcheck_float64(fmt, shape, chunk):
    lead, M, K, N = shape
    args = _operands(lead, M, K, N, fmt, r=5, seed=1, grad=True)
    assert torch.autograd.gradcheck(lambda *a: stl_apply(*a, fmt, N), args)


def test_partial_requires_grad_only_computes_what_is_asked():
    x, w, e, d = _operands((2,), 8, 12, 8, (4, 4, 4), 6, grad=False)
    x.requires_grad_()
    y = stl_apply(x, w, e, d, 4, 8)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    yr = stl_apply_reference(x, w, e, d, 4, 8)
    (gxr,) = torch.autograd.grad(yr, x, torch.ones_like(yr))
    assert torch.allclose(gx, gxr, rtol=1e-12, atol=1e-12)
    assert w.grad is None and e.grad is None and d.grad is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_close_to_float64_reference(seed):
    args64 = _operands((3,), 33, 50, 41, (4, 4, 4), 24, seed=seed)
    ref = stl_apply_reference(*args64, 4, 41)
    y = stl_apply(*(a.float() for a in args64), 4, 41)
    assert y.dtype == torch.float32
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_dtype_and_accuracy(dtype):
    args = [a.to(dtype) for a in _operands((2,), 16, 32, 24, (4, 4, 4), 24, seed=3)]
    y = stl_apply(*args, 4, 24)
    assert y.dtype == dtype
    ref = stl_apply_reference(*(a.double() for a in args), 4, 24)  # exact math on the rounded inputs
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2  # only the final rounding to bf16/fp16 (plus fp32 or native accumulation)


def test_low_precision_compute_dtype_policy():
    cdt = ops.compute_dtype(torch.bfloat16, "cpu")
    assert cdt == (torch.bfloat16 if ops.native_low_precision("cpu") else torch.float32)
    assert ops.compute_dtype(torch.float64, "cpu") == torch.float64
    assert ops.compute_dtype(torch.float32, "cpu") == torch.float32


def test_autocast_bf16_casts_operands_and_grads_reach_fp32_params():
    layer = STLinear(32, 24, tile=4, rank=24, init="random")
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for p in (layer.w_hat, layer.enc_x, layer.dec, x):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    ref = stl_apply_reference(*(t.detach().bfloat16().double() for t in (x, layer.w_hat, layer.enc_x, layer.dec)), (4, 4, 4), 24)
    ref = ref + layer.bias.detach().bfloat16().double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_exact_algorithm_through_fast_path_equals_matmul():
    x = torch.randn(3, 10, 14, dtype=torch.float64)
    w = torch.randn(14, 9, dtype=torch.float64)
    assert torch.allclose(stl_matmul(x, w, "strassen_x_strassen"), x @ w, rtol=1e-12, atol=1e-12)


def test_custom_op_opcheck_fake_and_autograd():
    args = _operands((2,), 5, 9, 7, (4, 4, 4), 6, dtype=torch.float32, grad=True)
    x, w, e, d = args
    # schema, fake (meta) kernel vs real kernel, autograd registration; the aot_dispatch checks
    # (20 s of compiling) are left out, torch.export below traces the op instead
    torch.library.opcheck(
        torch.ops.strassenkit.stl_forward.default, (x.view(2, 5, 9), w, e, d, 4, 4, 4, 7),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_export_keeps_the_custom_op():
    layer = STLinear(16, 12, tile=4, rank=8, init="random").eval()
    x = torch.randn(2, 8, 16)
    ep = torch.export.export(layer, (x,))
    assert "strassenkit.stl_forward" in str(ep.graph)
    assert torch.allclose(ep.module()(x), layer(x), atol=1e-6)


def test_bad_out_features_raises_clear_error():
    x, w, e, d = _operands((), 8, 8, 8, (4, 4, 4), 4)
    with pytest.raises(ValueError, match="out_features"):
        stl_apply(x, w, e, d, 4, 3)


def test_empty_batch():
    x, w, e, d = _operands((), 8, 8, 8, (4, 4, 4), 4)
    y = stl_apply(x.new_zeros(0, 8, 8), w, e, d, 4, 8)
    assert y.shape == (0, 8, 8)


def test_backward_keeps_no_tile_copy_of_x():
    """Saved for backward: the 4 inputs + x_hat + prod, nothing of the size of a tiled copy of x."""
    x, w, e, d = _operands((4,), 64, 64, 64, (4, 4, 4), 24, dtype=torch.float32, grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stl_apply(x, w, e, d, 4, 64)
    r, Bmt, Kt, Nt = 24, 4 * 16, 16, 16
    expected = sorted([x.numel(), w.numel(), e.numel(), d.numel(), r * Bmt * Kt, r * Bmt * Nt])
    assert sorted(sizes) == expected


def test_double_backward_raises_clear_error():
    x, w, e, d = _operands((1,), 4, 4, 4, (4, 4, 4), 3, grad=True)
    y = stl_apply(x, w, e, d, 4, 4)
    with pytest.raises(NotImplementedError, match="stl_apply_reference"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_plain_path_used_under_flop_counter_matches_reference():
    from torch.utils.flop_counter import FlopCounterMode

    args = _operands((2,), 9, 10, 11, (4, 4, 4), 6, grad=True)
    with FlopCounterMode(display=False) as fc:
        assert ops.flop_counting_active()
        y = stl_apply(*args, 4, 11)
    assert not ops.flop_counting_active()
    assert fc.get_total_flops() > 0
    ref = stl_apply_reference(*args, 4, 11)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
