"""Native bf16 encode/decode (bf16 in and out, float32 arithmetic, one rounding): against the float64 reference,
and the bf16 fast path through them against the pure-PyTorch bf16 path."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from strassenkit.functional import native, ops, stl_apply, stl_apply_reference

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")
K_OPS = torch.ops.strassenkit_native if native.available() else None


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> None:
    """bf16 keeps 8 significant bits: the float64 value rounded once is within half an ulp (2^-8 relative);
    float32 accumulation may tip a near-tie, so allow one ulp (2^-7), plus a tiny absolute slack near 0."""
    err = (got.double() - exact).abs()
    bound = exact.abs() * 2.0**-7 + 1e-30 + exact.abs().max() * 2.0**-20
    assert bool((err <= bound).all()), float((err / bound).max())


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), M=st.integers(1, 13), K=st.integers(1, 21), N=st.integers(1, 21),
       fmt=st.sampled_from([(4, 4, 4), (2, 2, 2), (1, 4, 4), (2, 3, 4)]), r=st.integers(1, 9), seed=st.integers(0, 999),
       bias=st.booleans())
def test_encode_decode_bf16_match_float64_rounded_once(B, M, K, N, fmt, r, seed, bias):
    n, m, p = fmt
    g = torch.Generator().manual_seed(seed)
    Mt, Kt, Nt = -(-M // n), -(-K // m), -(-N // p)
    x = torch.randn(B, M, K, generator=g).bfloat16()
    enc = torch.randn(r, n * m, generator=g)
    out = K_OPS.encode_bf16(x, enc, n, m, Mt, Kt, True, x.new_empty(0))[0]
    assert out.dtype == torch.bfloat16 and out.shape == (r, B * Mt, Kt)
    G = torch.randn(r, B * Mt, Kt, generator=g).bfloat16()
    with ops.backend("torch"):
        ref, genc_ref = ops._encode(x.double(), enc.double(), n, m, Mt, Kt, wgrad_of=G.double())
    _within_one_ulp(out, ref)
    # the encoder gradient sum over tiles of G x tiles^T: float32 accumulation of exact bf16 products
    only_grad, genc = K_OPS.encode_bf16(x, enc, n, m, Mt, Kt, False, G)
    assert only_grad.numel() == 0 and genc.dtype == torch.float32 and genc.shape == (r, n * m)
    scale = (G.double().abs().sum(dim=(1, 2)).max() * x.double().abs().max()).clamp(min=1.0)
    assert float((genc.double() - genc_ref).abs().max() / scale) < 1e-6
    prod = torch.randn(r, B * Mt, Nt, generator=g).bfloat16()
    dec = torch.randn(n * p, r, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    y = K_OPS.decode_bf16(prod, dec, n, p, B, Mt, M, N, b)
    with ops.backend("torch"):
        yref = ops._decode(prod.double(), dec.double(), n, p, B, Mt, M, N)
    if b is not None:
        yref = yref + b.double()
    assert y.dtype == torch.bfloat16 and y.shape == (B, M, N)
    _within_one_ulp(y, yref)


def test_bf16_ops_reject_other_dtypes_clearly():
    x = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="x must be a bfloat16 CPU tensor"):
        K_OPS.encode_bf16(x, torch.randn(3, 16), 4, 4, 1, 2, True, x.new_empty(0))
    with pytest.raises(RuntimeError, match="enc must be a float32 CPU tensor"):
        K_OPS.encode_bf16(x.bfloat16(), torch.randn(3, 16).double(), 4, 4, 1, 2, True, x.new_empty(0))
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU tensor"):
        K_OPS.decode_bf16(torch.randn(3, 1, 2).bfloat16(), torch.randn(16, 3), 4, 4, 1, 1, 4, 8,
                          torch.randn(8).bfloat16())


def test_nan_stays_in_its_tile_and_inf_rounds_like_torch():
    x = torch.randn(1, 8, 8).bfloat16()
    x[0, 1, 3] = float("nan")
    out = K_OPS.encode_bf16(x, torch.randn(5, 16), 4, 4, 2, 2, True, x.new_empty(0))[0]
    assert out[:, 0, 0].isnan().all() and not out[:, 1].isnan().any()  # tile row 0, tile column 0 only
    assert not out[:, 0, 1].isnan().any()
    big = torch.full((1, 4, 4), 3.0e38).bfloat16()
    y = K_OPS.encode_bf16(big, torch.ones(1, 16), 4, 4, 1, 1, True, big.new_empty(0))[0]  # 16 * 3e38 overflows float32: inf, as torch rounds it
    assert torch.isinf(y).all()


@pytest.mark.parametrize("shape", [(2, 37, 40, 24), (1, 64, 128, 96)])
def test_bf16_fast_path_uses_them_and_is_at_least_as_accurate_as_the_torch_path(shape, monkeypatch):
    """Where bf16 is the compute dtype (CPUs with native bf16 GEMMs; forced here so that every CPU runs it),
    stl_apply's forward and gradients go through the native bf16 kernels and stay within bf16 rounding of
    the float64 reference, like the pure-PyTorch bf16 path."""
    monkeypatch.setattr(ops, "native_low_precision", lambda device_type: True)
    B, M, K, N = shape
    g = torch.Generator().manual_seed(0)
    r = 24
    x64 = torch.randn(B, M, K, generator=g, dtype=torch.float64)
    w64 = torch.randn(r, -(-K // 4), -(-N // 4), generator=g, dtype=torch.float64) / K**0.5
    e64, d64 = torch.randn(r, 16, generator=g, dtype=torch.float64) / 4, torch.randn(16, r, generator=g, dtype=torch.float64) / 5
    b64 = torch.randn(N, generator=g, dtype=torch.float64)
    calls = []
    for name in ("encode_bf16", "decode_bf16"):
        real = getattr(K_OPS, name)
        monkeypatch.setattr(ops.torch.ops.strassenkit_native, name,
                            lambda *a, _real=real, _n=name: (calls.append(_n), _real(*a))[1], raising=False)
    ref = stl_apply_reference(x64, w64, e64, d64, 4, N) + b64
    errs = {}
    for backend in ("auto", "torch"):
        ps = [t.bfloat16().requires_grad_() for t in (x64, w64, e64, d64, b64)]
        with ops.backend(backend):
            y = stl_apply(*ps[:4], 4, N, bias=ps[4])
            y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16
        errs[backend] = float((y.detach().double() - ref).abs().max() / ref.abs().max())
        assert errs[backend] < 0.03, (backend, errs[backend])
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ps)
    assert "encode_bf16" in calls and "decode_bf16" in calls  # forward, and the gradients of x, enc_x, dec
    assert errs["auto"] <= errs["torch"] * 1.05 + 1e-3
