"""The streamed calibration path (TileStats: normal equations accumulated batch by batch) against the
reference path that holds every activation (TileData), in float64 on random data with padding everywhere."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import strassenkit as sk
from strassenkit.surgery.calibrate import (TileData, TileStats, _execution_groups, fit_dec, fit_dec_stats, fit_enc_x,
                                           fit_enc_x_stats, fit_w_hat, fit_w_hat_reference, fit_w_hat_stats,
                                           stats_error, tile_error)


def _batches(seed, nb=3, B=8, L=9, K=10, N=9):
    """Correlated inputs, ragged right padding (L % 4, K % 4, N % 4 != 0), a dense target weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) * torch.logspace(0, -1, K, dtype=torch.float64)[:, None]
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    out = []
    for _ in range(nb):
        x = torch.randn(B, L, K, generator=g, dtype=torch.float64) @ mix
        lens = torch.randint(1, L + 1, (B,), generator=g)
        m = (torch.arange(L)[None] < lens[:, None]).long()
        out.append((x, x @ W.T, m))
    return out, W


def _codec(seed, r=12, n=4, t=4):
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(r, n * t, generator=g, dtype=torch.float64) / t,
            torch.randn(n * t, r, generator=g, dtype=torch.float64) / math.sqrt(r))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_statistics_give_the_reference_fits(seed):
    bs, W = _batches(seed)
    d = TileData.from_activations([x for x, _, _ in bs], [y for _, y, _ in bs], 4, 4, [m for _, _, m in bs])
    st = TileStats.empty(10, 9, 4, 4, torch.float64)
    for x, y, m in bs:  # batch by batch: nothing but the sums is kept
        st.add(x, y, m)
    assert st.rows == int(d.valid.sum())
    enc_x, dec = _codec(seed)
    w_ref = fit_w_hat(d, enc_x, dec, ridge=0.0)
    w = fit_w_hat_stats(st, enc_x, dec, ridge=0.0)
    torch.testing.assert_close(w, w_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w, fit_w_hat_reference(d, enc_x, dec), rtol=1e-7, atol=1e-9)
    for a, b in zip(stats_error(st, enc_x, w, dec), tile_error(d, enc_x, w, dec)):
        assert a == pytest.approx(b, rel=1e-9)
    dec2 = fit_dec_stats(st, enc_x, w, ridge=0.0)
    torch.testing.assert_close(dec2, fit_dec(d, enc_x, w, ridge=0.0), rtol=1e-8, atol=1e-10)
    enc2 = fit_enc_x_stats(st, dec2, w, ridge=0.0)
    torch.testing.assert_close(enc2, fit_enc_x(d, dec2, w, ridge=0.0, method="data"), rtol=1e-7, atol=1e-9)
    assert stats_error(st, enc2, w, dec2)[0] <= stats_error(st, enc_x, w, dec)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_target_from_input_gram_equals_streamed_target(seed):
    bs, W = _batches(seed)
    a = TileStats.empty(10, 9, 4, 4, torch.float64)
    b = TileStats.empty(10, 9, 4, 4, torch.float64)
    for x, y, m in bs:
        a.add(x, y, m)
        b.add(x, None, m)  # inputs only
    b.set_dense_target(W)
    torch.testing.assert_close(b.C, a.C, rtol=1e-10, atol=1e-10)
    assert float(b.yy) == pytest.approx(float(a.yy), rel=1e-12)
    # a second layer on the same inputs shares S and gets its own target
    W2 = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    c = TileStats.empty(10, 5, 4, 4, torch.float64, share_inputs=b).set_dense_target(W2)
    assert c.S is b.S
    d2 = TileData.from_activations([x for x, _, _ in bs], [x @ W2.T for x, _, _ in bs], 4, 4, [m for _, _, m in bs])
    enc_x, dec = _codec(seed)
    torch.testing.assert_close(fit_w_hat_stats(c, enc_x, dec, 0.0), fit_w_hat(d2, enc_x, dec, 0.0), rtol=1e-8, atol=1e-10)


def _tiny_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=60, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _padded(n, B=6, L=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 60, (B, L), generator=g)
        lens = torch.randint(2, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None] < lens[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.mark.parametrize("sequential", [True, False])
def test_calibrate_stats_path_equals_data_path_on_padded_bert(sequential):
    dense = _tiny_bert()
    a = copy.deepcopy(dense)
    sk.strassenify_(a, sk.STLConfig(tile=4, rank=12, init="random"))
    b = copy.deepcopy(a)
    batches = _padded(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra = sk.calibrate_(a, batches, reference=dense, alternate=1, sequential=sequential, ridge=1e-6,
                           progress=False, method="data")
        rb = sk.calibrate_(b, batches, reference=dense, alternate=1, sequential=sequential, ridge=1e-6,
                           progress=False, method="stats", dtype=torch.float64)
    assert [c.name for c in ra.layers] == [c.name for c in rb.layers]
    for ca, cb in zip(ra.layers, rb.layers):
        assert cb.rows == ca.rows and cb.equations == ca.equations
        assert cb.rel_err_before == pytest.approx(ca.rel_err_before, rel=1e-6)
        assert cb.rel_err_after == pytest.approx(ca.rel_err_after, rel=1e-5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)


def test_query_key_value_share_one_input_gram():
    model = _tiny_bert()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=12, init="random"))
    stl = [(n, m) for n, m in model.named_modules() if isinstance(m, sk.STLinear)]
    groups = [[n.split("encoder.layer.")[-1] for n, _ in g] for g in _execution_groups(model, stl, _padded(1)[0])]
    assert groups[0] == ["0.attention.self.query", "0.attention.self.key", "0.attention.self.value"]
    assert groups[1:4] == [["0.attention.output.dense"], ["0.intermediate.dense"], ["0.output.dense"]]
    assert len(groups) == 8


def test_float32_statistics_are_close_to_float64():
    dense = _tiny_bert(1)
    a = copy.deepcopy(dense)
    sk.strassenify_(a, sk.STLConfig(tile=4, rank=12, init="random"))
    b = copy.deepcopy(a)
    batches = _padded(6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r64 = sk.calibrate_(a, batches, reference=dense, progress=False, dtype=torch.float64, ridge=1e-4)
        r32 = sk.calibrate_(b, batches, reference=dense, progress=False, dtype=torch.float32, ridge=1e-4)
    for c64, c32 in zip(r64.layers, r32.layers):
        assert c32.rel_err_after == pytest.approx(c64.rel_err_after, rel=1e-2, abs=1e-3)


def test_reference_target_fits_the_dense_models_outputs():
    """target='reference': Y = the dense model's own activations of that module, X = the converted model's inputs."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8)).double()
    model = copy.deepcopy(dense)
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=10, init="random"), head=None)
    batches = [torch.randn(3, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    m_dense = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.calibrate_(m_dense, batches, reference=dense, progress=False, dtype=torch.float64, ridge=0.0)
        sk.calibrate_(model, batches, reference=dense, progress=False, dtype=torch.float64, ridge=0.0, target="reference")
    # first layer: same inputs in both models, so both targets agree
    torch.testing.assert_close(model[0].w_hat, m_dense[0].w_hat, rtol=1e-8, atol=1e-10)
    # second layer: least squares from the converted model's inputs to the dense model's pre-bias outputs
    with torch.no_grad():
        xs = [model[1](model[0](b)) for b in batches]
        ys = [dense[1](dense[0](b)) @ dense[2].weight.T for b in batches]
    d = TileData.from_activations(xs, ys, 4, 4)
    enc_x, dec = model[2].enc_x.detach(), model[2].dec.detach()
    torch.testing.assert_close(model[2].w_hat.detach(), fit_w_hat(d, enc_x, dec, 0.0), rtol=1e-7, atol=1e-9)
    assert not torch.allclose(model[2].w_hat, m_dense[2].w_hat)
    with pytest.raises(ValueError, match="reference"):
        sk.calibrate_(model, batches, progress=False, target="reference")


def test_blocked_upper_triangle_gram_equals_full_product(monkeypatch):
    from strassenkit.surgery import calibrate

    monkeypatch.setattr(calibrate, "_SYRK_BLOCK", 4)  # force the blocked path on a small layer
    bs, W = _batches(3, K=13)
    st = TileStats.empty(13, 9, 4, 4, torch.float64)
    for x, _, m in bs:
        st.add(x, None, m)
    d = TileData.from_activations([x for x, _, _ in bs], [x @ W.T for x, _, _ in bs], 4, 4, [m for _, _, m in bs])
    assert st.S.stale  # the full-rows class used the blocked update
    for v in list(st.S.keys()):
        Xv = d.Xt[d.valid == v][:, : v * 4].reshape(-1, v * 4 * 4)
        torch.testing.assert_close(st.S[v], Xv.T @ Xv, rtol=1e-12, atol=1e-12)
    assert not st.S.stale
    st.set_dense_target(W)
    enc_x, dec = _codec(3)
    torch.testing.assert_close(fit_w_hat_stats(st, enc_x, dec, 0.0), fit_w_hat(d, enc_x, dec, 0.0), rtol=1e-8, atol=1e-10)


def test_sequential_calibration_runs_one_block_at_a_time_on_cached_inputs():
    """Repeated blocks (transformer layers): the whole model runs once per batch to fill the cache, then only
    the block being calibrated runs (plus one checking pass per block boundary); results equal the data path."""
    dense = _tiny_bert(2)
    a = copy.deepcopy(dense)
    sk.strassenify_(a, sk.STLConfig(tile=4, rank=12, init="random"))
    b = copy.deepcopy(a)
    batches = _padded(5, seed=2)
    calls = []
    h = b.embeddings.register_forward_hook(lambda *_: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rb = sk.calibrate_(b, batches, reference=dense, progress=False, dtype=torch.float64, ridge=1e-6)
        ra = sk.calibrate_(a, batches, reference=dense, progress=False, method="data", ridge=1e-6)
    h.remove()
    assert len(calls) <= len(batches) + 2 + 1  # fill the cache, one check per boundary, one probe for the groups
    for ca, cb in zip(ra.layers, rb.layers):
        assert cb.rel_err_after == pytest.approx(ca.rel_err_after, rel=1e-5)


def test_block_cache_and_whole_model_passes_agree_for_the_reference_target(monkeypatch):
    from strassenkit.surgery import calibrate

    dense = _tiny_bert(3)
    a = copy.deepcopy(dense)
    sk.strassenify_(a, sk.STLConfig(tile=4, rank=12, init="random"))
    b = copy.deepcopy(a)
    batches = _padded(4, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra = sk.calibrate_(a, batches, reference=dense, progress=False, dtype=torch.float64, target="reference",
                           heldout=batches[:2])
        monkeypatch.setattr(calibrate, "_find_blocks", lambda *_: None)
        rb = sk.calibrate_(b, batches, reference=dense, progress=False, dtype=torch.float64, target="reference",
                           heldout=batches[:2])
    for ca, cb in zip(ra.layers, rb.layers):
        assert ca.rel_err_after == pytest.approx(cb.rel_err_after, rel=1e-6)
        assert ca.rel_err_heldout_after == pytest.approx(cb.rel_err_heldout_after, rel=1e-6)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-6, atol=1e-7)


def _ridge_case(seed=0):
    """One 64 -> 16 layer calibrated on few rows (underdetermined with a tiny ridge), held out on others."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Sequential(nn.Linear(64, 16, bias=False)).double()
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 64, dtype=torch.float64)
    make = lambda n: [torch.randn(2, 16, 64, generator=g, dtype=torch.float64) @ mix for _ in range(n)]  # noqa: E731
    model = copy.deepcopy(dense)
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24, init="random", seed=seed), head=None)
    return dense, model, make(2), make(4)


def test_ridge_list_picks_the_held_out_best_per_layer():
    dense, model, fit, held = _ridge_case()
    ridges = [1e-8, 1e-4, 1e-2, 1e-1, 1.0]
    single = {}
    for v in ridges:
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single[v] = sk.calibrate_(m, fit, reference=dense, ridge=v, heldout=held, progress=False,
                                      dtype=torch.float64).layers[0].rel_err_heldout_after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = sk.calibrate_(model, fit, reference=dense, ridge=ridges, heldout=held, progress=False,
                            dtype=torch.float64).layers[0]
    best = min(single, key=single.get)
    assert rep.ridge == best and best > 1e-8  # the tiny ridge overfits the few rows
    assert rep.rel_err_heldout_after == pytest.approx(single[best], rel=1e-9)
    assert single[1e-8] > 1.05 * single[best]


def test_ridge_list_needs_heldout_batches():
    dense, model, fit, _ = _ridge_case()
    with pytest.raises(ValueError, match="heldout="):
        sk.calibrate_(model, fit, reference=dense, ridge=[1e-4, 1e-2], progress=False)
    with pytest.raises(ValueError, match="ridge"):
        sk.calibrate_(model, fit, reference=dense, ridge=[1e-4, -1.0], heldout=fit, progress=False)


def test_ridge_list_on_a_padded_hugging_face_bert():
    dense = _tiny_bert(4)
    model = copy.deepcopy(dense)
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=12, init="random"))
    single = copy.deepcopy(model)
    fit, held = _padded(2, seed=5), _padded(2, seed=6)
    ridges = [1e-6, 1e-3, 1e-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = sk.calibrate_(model, fit, reference=dense, ridge=ridges, heldout=held, progress=False)
        one = sk.calibrate_(single, fit, reference=dense, ridge=1e-6, heldout=held, progress=False)
    assert len(rep.layers) == len(one.layers) > 0 and all(c.ridge in ridges for c in rep.layers)
    # the first layer sees the same inputs in both runs: the chosen ridge is no worse on held-out data
    assert rep.layers[0].rel_err_heldout_after <= one.layers[0].rel_err_heldout_after * (1 + 1e-3)
    with torch.no_grad():
        assert torch.isfinite(model(**held[0]).last_hidden_state).all()
