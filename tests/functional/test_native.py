"""The native STL kernels (csrc/stl_kernels.cpp) against the pure-PyTorch backend and einsum references.

Raw ops (torch.ops.strassenkit_native.encode/decode) on random shapes, incl. chunk tails and the
encoder-gradient output; the full fast path under backend "native" vs "torch" vs stl_apply_reference
with 1 and 2 threads; determinism; backend selection; the STRASSENKIT_NATIVE=0 fallback; error checks.
"""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import strassenkit.functional.ops as ops
from strassenkit.functional import native, stl_apply, stl_apply_reference

NATIVE_OK = native.available()  # compiles the kernels once per machine (cached)
requires_native = pytest.mark.skipif(
    not NATIVE_OK,
    reason="native STL kernels unavailable (no compiler, or STRASSENKIT_NATIVE=0); see test_native_builds_here",
)

# tile formats (n, m, p): fixed ones (incl. non-square and width-4 tiles, which have a vectorized
# gather/scatter for float32) plus any format with sides 1..5
FORMATS = st.one_of(
    st.sampled_from([(2, 3, 2), (4, 4, 4), (1, 4, 4), (4, 1, 4), (3, 5, 2), (5, 2, 3)]),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _ceil(a, b):
    return -(-a // b)


@contextlib.contextmanager
def _threads(k):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _spy_native():
    """Count calls of torch.ops.strassenkit_native.{encode,decode,bmm,fused_*} (still running the real ops)."""
    ns = torch.ops.strassenkit_native
    calls = {"encode": 0, "decode": 0, "bmm": 0, "fused_forward": 0, "fused_backward": 0}
    originals = {name: getattr(ns, name) for name in calls}

    def wrap(name):
        def f(*args):
            calls[name] += 1
            return originals[name](*args)

        return f

    for name in calls:
        setattr(ns, name, wrap(name))
    try:
        yield calls
    finally:
        for name, op in originals.items():
            setattr(ns, name, op)


def _assert_close(a, b, tol, what, scale=None):
    """max |a - b| <= tol * max |scale| (default scale: b, the reference).

    For sums of many terms pass scale = the same sum over absolute values: rounding error is relative
    to that, not to a result that cancellation made small.
    """
    assert a.shape == b.shape, (what, tuple(a.shape), tuple(b.shape))
    if b.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    scale = (b if scale is None else scale).double().abs().max().clamp(min=1e-6).item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"


@st.composite
def _tile_cols(draw, w):
    """(tile columns T, matrix columns C) with T < 16 or T > 64 (not a multiple of 16); C mostly ragged."""
    if draw(st.booleans()):
        T = draw(st.integers(65, 100).filter(lambda v: v % 16))
    else:
        T = draw(st.integers(1, 15))
    slack = draw(st.integers(0, w - 1)) if w > 1 else 0
    return T, T * w - slack


def _randn(gen, dtype, *shape, layout="contiguous"):
    """Random normals of the given shape; layout "strided" gives a non-contiguous (transposed) view."""
    if layout == "strided" and len(shape) >= 2:
        big = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64)
        return big.to(dtype).transpose(-1, -2)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- explicit references
def _encode_ref(x, enc, G, n, m, Mt, Kt):
    """float64 einsum: out[l, b*Mt+a, c] = sum_ij enc[l, i*m+j] x[b, a*n+i, c*m+j]; genc = sum G x tiles."""
    B, M, K = x.shape
    r = enc.shape[0]
    xp = torch.nn.functional.pad(x.double(), (0, Kt * m - K, 0, Mt * n - M))
    xt = xp.reshape(B, Mt, n, Kt, m)  # [b, a, i, c, j]
    out = torch.einsum("lij,baicj->lbac", enc.double().reshape(r, n, m), xt).reshape(r, B * Mt, Kt)
    genc = torch.einsum("lbac,baicj->lij", G.double().reshape(r, B, Mt, Kt), xt).reshape(r, n * m)
    return out, genc


def _decode_ref(P, dec, n, p, B, Mt, M, N):
    """float64 einsum: y[b, a*n+i, c*p+k] = sum_l dec[i*p+k, l] P[l, b*Mt+a, c]."""
    r, _, Nt = P.shape
    y = torch.einsum("ikl,lbac->baick", dec.double().reshape(n, p, r), P.double().reshape(r, B, Mt, Nt))
    return y.reshape(B, Mt * n, Nt * p)[:, :M, :N]


# --------------------------------------------------------------------------- raw ops
@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@settings(max_examples=30, deadline=None)
@given(data=st.data(), fmt=FORMATS, r=st.integers(1, 50), B=st.integers(1, 3), M=st.integers(1, 12),
       threads=st.sampled_from([1, 2]), layout=st.sampled_from(["contiguous", "strided"]), seed=st.integers(0, 2**16))
def test_native_encode_matches_torch_backend_and_reference(dtype, data, fmt, r, B, M, threads, layout, seed):
    n, m, _ = fmt
    Kt, K = data.draw(_tile_cols(m), label="Kt, K")
    Mt = _ceil(M, n)
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, dtype, B, M, K, layout=layout)
    enc = _randn(gen, dtype, r, n * m, layout=layout)  # ops passes dec.t() here: non-contiguous
    G = _randn(gen, dtype, r, B * Mt, Kt)
    nat = torch.ops.strassenkit_native
    with _threads(threads):
        out, genc = nat.encode(x, enc, n, m, Mt, Kt, True, G)
        out_only, no_genc = nat.encode(x, enc, n, m, Mt, Kt, True, x.new_empty(0))
        no_out, genc_only = nat.encode(x, enc, n, m, Mt, Kt, False, G)
        with ops.backend("native"):  # the ops.py wrappers dispatch to the same kernels
            w_out, w_genc = ops._encode(x, enc, n, m, Mt, Kt, wgrad_of=G)
            w_genc2 = ops._tiles_wgrad(x, G, n, m, Mt, Kt)
        with ops.backend("torch"):
            t_out, t_genc = ops._encode(x, enc, n, m, Mt, Kt, wgrad_of=G)
            t_genc2 = ops._tiles_wgrad(x, G, n, m, Mt, Kt)
    ref_out, ref_genc = _encode_ref(x, enc, G, n, m, Mt, Kt)
    abs_out, abs_genc = _encode_ref(x.abs(), enc.abs(), G.abs(), n, m, Mt, Kt)
    tol = TOL[dtype]

    assert out.dtype == genc.dtype == dtype
    assert no_genc.numel() == 0 and no_out.numel() == 0
    _assert_close(out, ref_out, tol, "encode out vs einsum", abs_out)
    _assert_close(genc, ref_genc, tol, "encode genc vs einsum", abs_genc)
    _assert_close(out_only, ref_out, tol, "encode out (G empty) vs einsum", abs_out)
    _assert_close(genc_only, ref_genc, tol, "encode genc (want_out=False) vs einsum", abs_genc)
    assert torch.equal(out_only, out), "out must not depend on whether genc is requested"
    assert torch.equal(w_out, out) and torch.equal(w_genc, genc), "ops._encode[native] must be the native kernel"
    assert torch.equal(w_genc2, genc_only), "ops._tiles_wgrad[native] must be encode(want_out=False)"
    _assert_close(out, t_out.to(dtype), 2 * tol, "native vs torch backend: out", abs_out)
    _assert_close(genc, t_genc, 2 * tol, "native vs torch backend: genc", abs_genc)
    _assert_close(genc_only, t_genc2, 2 * tol, "native (want_out=False) vs torch _tiles_wgrad", abs_genc)
    _assert_close(t_out, ref_out, tol, "torch backend out vs einsum", abs_out)
    _assert_close(t_genc, ref_genc, tol, "torch backend genc vs einsum", abs_genc)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@settings(max_examples=30, deadline=None)
@given(data=st.data(), fmt=FORMATS, r=st.integers(1, 50), B=st.integers(1, 3), M=st.integers(1, 12),
       threads=st.sampled_from([1, 2]), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_native_decode_matches_torch_backend_and_reference(dtype, data, fmt, r, B, M, threads, strided, seed):
    n, _, p = fmt
    Nt, N = data.draw(_tile_cols(p), label="Nt, N")
    Mt = _ceil(M, n)
    gen = torch.Generator().manual_seed(seed)
    P = _randn(gen, dtype, r, B * Mt, Nt, layout="strided" if strided else "contiguous")
    dec = _randn(gen, dtype, n * p, r, layout="strided" if strided else "contiguous")
    with _threads(threads):
        y = torch.ops.strassenkit_native.decode(P, dec, n, p, B, Mt, M, N)
        with ops.backend("native"):
            w_y = ops._decode(P, dec, n, p, B, Mt, M, N)
        with ops.backend("torch"):
            t_y = ops._decode(P, dec, n, p, B, Mt, M, N)
    ref = _decode_ref(P, dec, n, p, B, Mt, M, N)
    abs_ref = _decode_ref(P.abs(), dec.abs(), n, p, B, Mt, M, N)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.is_contiguous()
    _assert_close(y, ref, tol, "decode vs einsum", abs_ref)
    assert torch.equal(w_y, y), "ops._decode[native] must be the native kernel"
    _assert_close(y, t_y, 2 * tol, "native vs torch backend: decode", abs_ref)
    _assert_close(t_y, ref, tol, "torch backend decode vs einsum", abs_ref)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "fmt,B,M,K",
    [
        ((4, 4, 4), 1, 1, 1),     # a single tile column: one chunk, all tail
        ((4, 4, 4), 2, 7, 131),   # 33 tile columns of width 4 (vectorized float gather), ragged last tile
        ((4, 4, 4), 3, 8, 256),   # exact multiples everywhere (no padding at all)
        ((2, 3, 2), 1, 3, 194),   # 65 tile columns: more than one float chunk per tile row
        ((1, 4, 4), 3, 5, 797),   # n = 1, 200 tile columns, rows spanning many chunks
        ((5, 1, 1), 2, 11, 97),   # width-1 tiles
        ((4, 4, 4), 1, 96, 10666),  # output > 4 MiB: streamed straight from registers; 8-column tail chunk
    ],
)
def test_native_encode_decode_fixed_shapes(dtype, fmt, B, M, K):
    n, m, p = fmt
    r = 23
    gen = torch.Generator().manual_seed(B * 1000 + K)
    Mt, Kt = _ceil(M, n), _ceil(K, m)
    N = Kt * p - (p > 1)  # decode the encoded x back with Nt = Kt tile columns, ragged last tile
    x = _randn(gen, dtype, B, M, K)
    enc = _randn(gen, dtype, r, n * m)
    G = _randn(gen, dtype, r, B * Mt, Kt)
    dec = _randn(gen, dtype, n * p, r)
    ref_out, ref_genc = _encode_ref(x, enc, G, n, m, Mt, Kt)
    for threads in (1, 2):
        with _threads(threads):
            out, genc = torch.ops.strassenkit_native.encode(x, enc, n, m, Mt, Kt, True, G)
            _, genc_only = torch.ops.strassenkit_native.encode(x, enc, n, m, Mt, Kt, False, G)
            y = torch.ops.strassenkit_native.decode(out, dec, n, p, B, Mt, M, N)
        _assert_close(out, ref_out, TOL[dtype], f"encode out, {threads} threads")
        _assert_close(genc, ref_genc, TOL[dtype], f"encode genc, {threads} threads")
        _assert_close(genc_only, ref_genc, TOL[dtype], f"encode genc (want_out=False), {threads} threads")
        _assert_close(y, _decode_ref(out, dec, n, p, B, Mt, M, N), TOL[dtype], f"decode, {threads} threads")


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_native_encode_with_extra_padding_tiles(dtype):
    """Mt/Kt larger than needed: the extra tiles are all zero (the contract says 'zero outside x')."""
    n, m, p, r, B, M, K = 2, 3, 2, 7, 2, 5, 10
    Mt, Kt = _ceil(M, n) + 1, _ceil(K, m) + 2
    gen = torch.Generator().manual_seed(7)
    x, enc, G = _randn(gen, dtype, B, M, K), _randn(gen, dtype, r, n * m), _randn(gen, dtype, r, B * Mt, Kt)
    out, genc = torch.ops.strassenkit_native.encode(x, enc, n, m, Mt, Kt, True, G)
    ref_out, ref_genc = _encode_ref(x, enc, G, n, m, Mt, Kt)
    _assert_close(out, ref_out, TOL[dtype], "out")
    _assert_close(genc, ref_genc, TOL[dtype], "genc")
    dec = _randn(gen, dtype, n * p, r)
    y = torch.ops.strassenkit_native.decode(out, dec, n, p, B, Mt, M, 2 * Kt - 1)
    _assert_close(y, _decode_ref(out, dec, n, p, B, Mt, M, 2 * Kt - 1), TOL[dtype], "decode")


@requires_native
def test_native_encode_empty_batch():
    x = torch.zeros(0, 4, 8)
    enc = torch.randn(3, 4)
    out, genc = torch.ops.strassenkit_native.encode(x, enc, 2, 2, 2, 4, True, torch.zeros(3, 0, 4))
    assert out.shape == (3, 0, 4)
    # G (3, 0, 4) has no elements, so it means "no encoder gradient requested"
    assert genc.numel() == 0
    y = torch.ops.strassenkit_native.decode(torch.zeros(3, 0, 4), torch.randn(4, 3), 2, 2, 0, 2, 4, 8)
    assert y.shape == (0, 4, 8)


# --------------------------------------------------------------------------- full fast path
def _operands(lead, M, K, N, fmt, r, dtype=torch.float64, seed=0):
    n, m, p = fmt
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(*lead, M, K), mk(r, _ceil(K, m), _ceil(N, p)), mk(r, n * m), mk(n * p, r)


def _fwd_bwd(fn, args, fmt, N, gy, wrt=(True, True, True, True)):
    """y and the grads of (x, w_hat, enc_x, dec) for cotangent gy (None where wrt is False)."""
    leaves = [a.detach().clone().requires_grad_(flag) for a, flag in zip(args, wrt)]
    y = fn(*leaves, fmt, N)
    grads = iter(torch.autograd.grad(y, [t for t in leaves if t.requires_grad], gy))
    return (y.detach(), *(next(grads) if flag else None for flag in wrt))


NAMES = ("y", "grad_x", "grad_w_hat", "grad_enc_x", "grad_dec")

ALL_GRADS = (True, True, True, True)  # gradients for x, w_hat, enc_x, dec


def _compare(results, ref, tol, what):
    for name, a, c in zip(NAMES, results, ref):
        if a is not None:
            _assert_close(a, c, tol, f"{what} {name}")


@requires_native
@pytest.mark.parametrize("fused", ["off", "on"])
@pytest.mark.parametrize("threads", [1, 2])
@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2), M=st.integers(1, 12), data=st.data(), fmt=FORMATS,
       r=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_stl_apply_native_vs_torch_vs_reference_float64(threads, fused, lead, M, data, fmt, r, seed):
    n, m, p = fmt
    _, K = data.draw(_tile_cols(m), label="Kt, K")
    _, N = data.draw(_tile_cols(p), label="Nt, N")
    args = _operands(lead, M, K, N, fmt, r, seed=seed)
    gy = torch.randn(*lead, M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref = _fwd_bwd(stl_apply_reference, args, fmt, N, gy)
    with _threads(threads):
        with ops.backend("native"), ops.fused(fused), _spy_native() as calls:
            nat = _fwd_bwd(stl_apply, args, fmt, N, gy, ALL_GRADS)
        if fused == "on":  # one fused call each way
            assert calls["fused_forward"] == 1 and calls["fused_backward"] == 1, calls
            assert calls["encode"] == calls["decode"] == calls["bmm"] == 0, calls
        else:
            assert calls["encode"] >= 2 and calls["decode"] >= 2, calls  # forward + backward went native
            assert calls["bmm"] == 3 and calls["fused_forward"] == 0, calls  # core GEMMs natively (pooled outputs)
        with ops.backend("torch"), ops.fused(fused), _spy_native() as calls:
            tor = _fwd_bwd(stl_apply, args, fmt, N, gy, ALL_GRADS)
        assert not any(calls.values()), calls
    _compare(nat, ref, 1e-12, f"native vs reference ({threads} threads):")
    _compare(tor, ref, 1e-12, f"torch vs reference ({threads} threads):")
    _compare(nat, tor, 1e-12, f"native vs torch ({threads} threads):")


@requires_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt,shape", [((4, 4, 4), ((2,), 37, 290, 70)), ((2, 3, 2), ((3,), 9, 200, 131)), ((3, 5, 1), ((), 10, 23, 7))])
def test_stl_apply_native_vs_torch_vs_reference_fixed(fmt, shape, threads):
    lead, M, K, N = shape
    args = _operands(lead, M, K, N, fmt, r=31, seed=threads)
    gy = torch.randn(*lead, M, N, dtype=torch.float64)
    ref = _fwd_bwd(stl_apply_reference, args, fmt, N, gy)
    with _threads(threads):
        with ops.backend("native"):
            nat = _fwd_bwd(stl_apply, args, fmt, N, gy, ALL_GRADS)
            # float32 too (against the float64 reference on the same, exactly representable, inputs)
            nat32 = _fwd_bwd(stl_apply, [a.float() for a in args], fmt, N, gy.float(), ALL_GRADS)
        with ops.backend("torch"):
            tor = _fwd_bwd(stl_apply, args, fmt, N, gy, ALL_GRADS)
    ref32 = _fwd_bwd(stl_apply_reference, [a.float().double() for a in args], fmt, N, gy.float().double())
    _compare(nat, ref, 1e-12, "native vs reference:")
    _compare(tor, ref, 1e-12, "torch vs reference:")
    assert all(t is None or t.dtype == torch.float32 for t in nat32)
    _compare(nat32, ref32, 1e-5, "native float32 vs float64 reference:")


@requires_native
@pytest.mark.parametrize("fused", ["off", "on"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_is_deterministic(dtype, threads, fused):
    # large enough that encode/decode split into several parts with 2 threads (>= 256k MACs each)
    fmt, lead, M, K, N, r = (4, 4, 4), (2,), 63, 255, 130, 49
    args = _operands(lead, M, K, N, fmt, r, dtype=dtype, seed=5)
    gy = torch.randn(*lead, M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(dtype)
    with _threads(threads), ops.backend("native"), ops.fused(fused), _spy_native() as calls:
        first = _fwd_bwd(stl_apply, args, fmt, N, gy, ALL_GRADS)
        second = _fwd_bwd(stl_apply, args, fmt, N, gy, ALL_GRADS)
    if fused == "on":
        assert calls["fused_forward"] == 2 and calls["fused_backward"] == 2, calls
    else:  # per run: encode x, grad_y, enc_x-grad; decode y, grad_x
        assert calls["encode"] == 6 and calls["decode"] == 4, calls
    for name, a, b in zip(NAMES, first, second):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), f"{name} differs between two native runs with {threads} threads"
    ref = _fwd_bwd(stl_apply_reference, [a.double() for a in args], fmt, N, gy.double())
    _compare(first, ref, TOL[dtype], f"native {dtype}, {threads} threads:")


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_native_bmm_matches_torch_bmm(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b = _randn(gen, dtype, 7, 13, 5), _randn(gen, dtype, 7, 5, 11, layout="strided")
    for threads in (1, 2):
        with _threads(threads):
            out = torch.ops.strassenkit_native.bmm(a, b)
        _assert_close(out, torch.bmm(a.double(), b.double()), TOL[dtype], f"bmm, {threads} threads")


@requires_native
@pytest.mark.parametrize("r", [1, 3, 7])
def test_native_bmm_splits_gemms_into_row_blocks_when_few_ranks(r):
    # With 2 threads, r < 8 ranks are cut into row blocks (pieces of >= 64 rows) so that no thread idles
    # at the end; every block must land in its own rows, and reruns must be bitwise equal.
    gen = torch.Generator().manual_seed(r)
    a, b = _randn(gen, torch.float32, r, 200, 17), _randn(gen, torch.float32, r, 17, 9)
    with _threads(2):
        out = torch.ops.strassenkit_native.bmm(a, b)
        again = torch.ops.strassenkit_native.bmm(a, b)
    _assert_close(out, torch.bmm(a.double(), b.double()), TOL[torch.float32], f"bmm r={r}, row blocks")
    assert torch.equal(out, again)


@requires_native
def test_native_bmm_multithreaded_with_grad_operands():
    x = torch.randn(8, 16)
    w_hat = torch.randn(4, 4, 4, requires_grad=True)  # rank 4 > 1: the r GEMMs go to both threads
    enc, dec = torch.randn(4, 16), torch.randn(16, 4)
    # Regression: the r GEMMs run on worker threads, which must inherit the caller's thread-local
    # dispatch state (below autograd inside the custom op), or mm_out refuses operands requiring grad.
    ref = stl_apply_reference(x, w_hat.detach(), enc, dec, 4)
    with _threads(2), ops.backend("native"):
        with torch.no_grad():
            y = stl_apply(x, w_hat, enc, dec, 4)
        y2 = stl_apply(x, w_hat, enc, dec, 4)
        y2.sum().backward()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(y2.detach(), ref, rtol=1e-5, atol=1e-5)
    assert w_hat.grad is not None and torch.isfinite(w_hat.grad).all()


# --------------------------------------------------------------------------- backend selection
@requires_native
def test_active_backend_native_when_available():
    assert ops.active_backend(torch.float32) == "native"
    assert ops.active_backend() == "native"
    assert ops.active_backend(torch.float64, "cpu") == "native"
    with ops.backend("torch"):
        assert ops.active_backend(torch.float32) == "torch"
        with ops.backend("native"):  # nested, restored on exit
            assert ops.active_backend(torch.float32) == "native"
        assert ops.active_backend(torch.float32) == "torch"
    assert ops.active_backend(torch.float32) == "native"


def test_active_backend_torch_for_other_dtypes_and_devices():
    assert ops.active_backend(torch.float16, "cuda") == "torch"
    assert ops.active_backend(torch.float32, "cuda") == "torch"
    assert ops.active_backend(torch.bfloat16, "cpu") == "torch"  # the kernels take float32/float64 only
    with ops.backend("auto"):
        assert ops.active_backend(torch.float16, "xpu") == "torch"


def test_backend_bogus_raises_value_error_and_state_is_restored():
    before = ops.active_backend(torch.float32)
    with pytest.raises(ValueError, match="backend"):
        with ops.backend("bogus"):
            pass
    with pytest.raises(ZeroDivisionError):
        with ops.backend("torch"):
            1 / 0  # noqa: B018
    assert ops.active_backend(torch.float32) == before
    assert ops._backend == "auto"


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_through_fast_path(dtype):
    fmt, N = (4, 4, 4), 24
    args = [a.to(dtype) for a in _operands((2,), 16, 30, N, fmt, 24, seed=3)]
    gy = torch.randn(2, 16, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(dtype)
    with _spy_native() as calls:
        y, *grads = _fwd_bwd(stl_apply, args, fmt, N, gy)
    if ops.compute_dtype(dtype, "cpu") == torch.float32:  # no native bf16 GEMMs on this CPU
        went_native = (calls["encode"] >= 2 and calls["decode"] >= 2) or calls["fused_backward"] == 1
        assert went_native, "float32 compute should use the native kernels"
    assert y.dtype == dtype
    ref = _fwd_bwd(stl_apply_reference, [a.double() for a in args], fmt, N, gy.double())  # exact math on rounded inputs
    for name, a, c in zip(NAMES, (y, *grads), ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        rel = ((a.double() - c).norm() / c.norm()).item()
        assert rel < 1e-2, (name, rel)


# --------------------------------------------------------------------------- STRASSENKIT_NATIVE=0
_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    import strassenkit.functional.ops as ops
    from strassenkit.functional import native, stl_apply, stl_apply_reference

    assert not native.enabled()
    assert native.available() is False, "native.available() must be False with STRASSENKIT_NATIVE=0"
    assert ops.active_backend() == "torch", ops.active_backend()
    assert ops.active_backend(torch.float64) == "torch"
    try:
        with ops.backend("native"):
            pass
    except RuntimeError:
        pass
    else:
        raise AssertionError("backend('native') must raise RuntimeError when native is disabled")
    try:
        with ops.backend("bogus"):
            pass
    except ValueError:
        pass
    else:
        raise AssertionError("backend('bogus') must raise ValueError")

    g = torch.Generator().manual_seed(0)
    n, m, p, r, M, K, N = 2, 3, 2, 7, 9, 13, 11
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    args = (mk(2, M, K), mk(r, -(-K // m), -(-N // p)), mk(r, n * m), mk(n * p, r))
    gy = torch.randn(2, M, N, generator=g, dtype=torch.float64)
    outs = []
    for fn in (stl_apply, stl_apply_reference):
        y = fn(*args, (n, m, p), N)
        outs.append((y, *torch.autograd.grad(y, args, gy)))
    for a, b in zip(*outs):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), (a - b).abs().max()
    print("FALLBACK-OK")
    """
)


def test_fallback_with_native_disabled_in_subprocess():
    env = dict(os.environ, STRASSENKIT_NATIVE="0")
    res = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FALLBACK-OK" in res.stdout
    assert "compiling native" not in res.stderr  # disabled means: no build attempt


# --------------------------------------------------------------------------- error checks
def _bad_calls():
    nat = torch.ops.strassenkit_native
    x, enc, G = torch.randn(2, 5, 6), torch.randn(3, 4), torch.randn(3, 6, 3)
    P, dec = torch.randn(3, 6, 3), torch.randn(4, 3)
    return {
        "encode int x": lambda: nat.encode(x.int(), enc, 2, 2, 3, 3, True, G),
        "encode int enc": lambda: nat.encode(x, enc.int(), 2, 2, 3, 3, True, G),
        "encode dtype mismatch": lambda: nat.encode(x, enc.double(), 2, 2, 3, 3, True, G),
        "encode enc not (r, n*m)": lambda: nat.encode(x, torch.randn(3, 5), 2, 2, 3, 3, True, G),
        "encode x not 3-D": lambda: nat.encode(x[0], enc, 2, 2, 3, 3, True, G),
        "encode Kt too small": lambda: nat.encode(x, enc, 2, 2, 3, 2, True, G),
        "encode Mt too small": lambda: nat.encode(x, enc, 2, 2, 2, 3, True, G),
        "encode G wrong shape": lambda: nat.encode(x, enc, 2, 2, 3, 3, True, torch.randn(3, 5, 3)),
        "encode G wrong dtype": lambda: nat.encode(x, enc, 2, 2, 3, 3, True, G.double()),
        "decode int P": lambda: nat.decode(P.int(), dec, 2, 2, 2, 3, 5, 6),
        "decode dtype mismatch": lambda: nat.decode(P, dec.double(), 2, 2, 2, 3, 5, 6),
        "decode P rows != B*Mt": lambda: nat.decode(P, dec, 2, 2, 2, 2, 4, 6),
        "decode dec not (n*p, r)": lambda: nat.decode(P, torch.randn(4, 2), 2, 2, 2, 3, 5, 6),
        "decode N too large": lambda: nat.decode(P, dec, 2, 2, 2, 3, 5, 7),
        "decode M too large": lambda: nat.decode(P, dec, 2, 2, 2, 3, 7, 6),
        "bmm shape mismatch": lambda: nat.bmm(torch.randn(3, 4, 5), torch.randn(3, 4, 5)),
        "bmm batch mismatch": lambda: nat.bmm(torch.randn(3, 4, 5), torch.randn(2, 5, 4)),
    }


BAD_CASES = [
    "encode int x", "encode int enc", "encode dtype mismatch", "encode enc not (r, n*m)", "encode x not 3-D",
    "encode Kt too small", "encode Mt too small", "encode G wrong shape", "encode G wrong dtype", "decode int P",
    "decode dtype mismatch", "decode P rows != B*Mt", "decode dec not (n*p, r)", "decode N too large",
    "decode M too large", "bmm shape mismatch", "bmm batch mismatch",
]


@requires_native
@pytest.mark.parametrize("case", BAD_CASES)
def test_native_ops_reject_bad_inputs(case):
    call = _bad_calls()[case]
    with pytest.raises(RuntimeError, match="strassenkit_native"):
        call()


# --------------------------------------------------------------------------- the build itself
def test_native_builds_here():
    """Fails (does not skip) when the kernels cannot be built, unless STRASSENKIT_NATIVE=0 disables them."""
    if not native.enabled():
        pytest.skip("native kernels disabled by STRASSENKIT_NATIVE=0")
    assert native.available(), f"native STL kernels failed to build/load: {native.build_info()} (see the RuntimeWarning)"
    assert hasattr(torch.ops.strassenkit_native, "encode")
    assert hasattr(torch.ops.strassenkit_native, "decode")
    assert hasattr(torch.ops.strassenkit_native, "bmm")


# --------------------------------------------------------------------------- tracing
@requires_native
def test_native_ops_have_fake_kernels():
    x, enc, dec = torch.randn(2, 9, 11), torch.randn(5, 12), torch.randn(12, 5)
    G = torch.randn(5, 2 * 3, 3)
    torch.library.opcheck(torch.ops.strassenkit_native.encode.default, (x, enc, 3, 4, 3, 3, True, G),
                          test_utils=("test_schema", "test_faketensor"))
    P = torch.randn(5, 2 * 3, 4)
    torch.library.opcheck(torch.ops.strassenkit_native.decode.default, (P, dec, 3, 4, 2, 3, 9, 14),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.strassenkit_native.bmm.default, (torch.randn(3, 4, 5), torch.randn(3, 5, 6)),
                          test_utils=("test_schema", "test_faketensor"))


@requires_native
def test_compiled_training_step_traces_the_native_backward():
    # AOT autograd traces the custom op's backward, which calls the native ops: they need fake kernels
    # (regression: without them torch.compile of a training step failed). aot_eager: no codegen, ~1 s.
    from strassenkit.nn import STLinear

    torch.manual_seed(0)
    layer = STLinear(16, 24, tile=4, rank=8, init="random")
    x = torch.randn(2, 8, 16)
    torch.compile(layer, backend="aot_eager")(x).square().sum().backward()
    compiled = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).square().sum().backward()
    for a, b in zip(compiled, (p.grad for p in layer.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stale_build_lock_is_removed_and_fresh_one_kept(tmp_path):
    # a build killed mid-way leaves cpp_extension's lock file; torch would wait on it forever
    lock = tmp_path / "lock"
    lock.write_text("")
    assert native.clear_stale_lock(tmp_path) is False and lock.exists()  # fresh: another build is running
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    assert native.clear_stale_lock(tmp_path) is True and not lock.exists()
    assert native.clear_stale_lock(tmp_path) is False  # nothing to remove
