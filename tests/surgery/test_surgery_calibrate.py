import copy
import math

import pytest
import torch
from torch import nn

from strassenkit import STLConfig, STLinear, calibrate_, strassenify_
from strassenkit.functional.stl import stl_apply
from strassenkit.surgery.calibrate import (
    TileData,
    fit_dec,
    fit_enc_x,
    fit_w_hat,
    fit_w_hat_reference,
    tile_error,
)


def _data(seed, B=6, L=7, K=10, N=9, n=4, t=4, r=12, decay=-1.0):
    """Padding on every axis: L % n, K % t, N % t != 0. Correlated inputs like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) * torch.logspace(0, decay, K, dtype=torch.float64)[:, None]
    x = torch.randn(B, L, K, generator=g, dtype=torch.float64) @ mix
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    enc_x = torch.randn(r, n * t, generator=g, dtype=torch.float64) / t
    dec = torch.randn(n * t, r, generator=g, dtype=torch.float64) / math.sqrt(r)
    d = TileData.from_activations([x], [x @ W.T], n, t)
    return d, x, W, enc_x, dec


def _loss_through_layer(x, W, enc_x, w_hat, dec, n, t):
    """||x W^T - STL(x)||^2 computed with the library's forward operator (independent of TileData)."""
    y = stl_apply(x, w_hat, enc_x, dec, (n, t, t), out_features=W.shape[0])
    return float((y - x @ W.T).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_w_hat_matches_lstsq_reference_and_the_forward_operator(seed):
    d, x, W, enc_x, dec = _data(seed)
    w1 = fit_w_hat(d, enc_x, dec, ridge=0.0)
    w2 = fit_w_hat_reference(d, enc_x, dec)
    assert w1.shape == (12, 3, 3)
    torch.testing.assert_close(w1, w2, rtol=1e-7, atol=1e-9)
    # tile_error agrees with the real layer forward (padding rows/cols excluded there by slicing)
    rel, sqnr = tile_error(d, enc_x, w1, dec)
    loss = _loss_through_layer(x, W, enc_x, w1, dec, 4, 4)
    assert rel == pytest.approx(math.sqrt(loss / float((x @ W.T).pow(2).sum())), rel=1e-9)
    assert sqnr == pytest.approx(-20 * math.log10(rel), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_w_hat_is_the_minimum_gradient_descent_finds(seed):
    d, x, W, enc_x, dec = _data(seed, decay=0.0)  # well conditioned, so L-BFGS converges in few steps
    w_ls = fit_w_hat(d, enc_x, dec, ridge=0.0)
    best = _loss_through_layer(x, W, enc_x, w_ls, dec, 4, 4)
    w = torch.zeros_like(w_ls, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=400, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        y = stl_apply(x, w, enc_x, dec, (4, 4, 4), out_features=W.shape[0])
        loss = (y - x @ W.T).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    gd = _loss_through_layer(x, W, enc_x, w.detach(), dec, 4, 4)
    assert best <= gd * (1 + 1e-9)
    assert gd == pytest.approx(best, rel=1e-5)
    # over-determined (rows >> unknowns): the minimizer is unique, so the parameters agree too
    torch.testing.assert_close(w.detach(), w_ls, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_enc_and_dec_steps_are_least_squares_optima(seed):
    d, x, W, enc_x, dec = _data(seed)
    w_hat = fit_w_hat(d, enc_x, dec)
    e0 = tile_error(d, enc_x, w_hat, dec)[0]
    dec2 = fit_dec(d, enc_x, w_hat, ridge=0.0)
    e1 = tile_error(d, enc_x, w_hat, dec2)[0]
    enc2 = fit_enc_x(d, dec2, w_hat, ridge=0.0, method="gram")
    enc2_data = fit_enc_x(d, dec2, w_hat, ridge=0.0, method="data", chunk=5)
    torch.testing.assert_close(enc2, enc2_data, rtol=1e-7, atol=1e-9)
    e2 = tile_error(d, enc2, w_hat, dec2)[0]
    assert e2 <= e1 <= e0
    # optimality: the gradient of the objective w.r.t. the fitted factor vanishes
    for name, args in (("dec", (enc_x, w_hat, dec2)), ("enc_x", (enc2, w_hat, dec2))):
        ex, wh, de = (a.clone().requires_grad_(True) for a in args)
        y = stl_apply(x, wh, ex, de, (4, 4, 4), out_features=W.shape[0])
        loss = (y - x @ W.T).pow(2).sum()
        loss.backward()
        g = (de if name == "dec" else ex).grad
        other = wh.grad  # not at an optimum in general: sets the scale
        assert g.norm() < 1e-6 * max(1.0, other.norm()), name


def _vit_setup():
    from strassenkit._models.digits import load_digits_split
    from strassenkit._models.vit import ViT
    from strassenkit.train import TrainConfig, train

    xtr, ytr, xte, yte = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=2, dim=32, depth=1, heads=2)
    train(model, (xtr, ytr), TrainConfig(steps=30, batch_size=64, lr=3e-3, warmup_steps=3, progress=False))
    return model.eval(), xtr, xte


@pytest.fixture(scope="module")
def vit():
    return _vit_setup()


def test_calibration_reduces_error_on_digits_vit(vit):
    dense, xtr, xte = vit
    with torch.no_grad():
        ref = dense(xte)
    errs = {}
    for seed in (0, 1):
        for alternate in (0, 1):
            m = copy.deepcopy(dense)
            strassenify_(m, STLConfig(seed=seed))
            with torch.no_grad():
                before = float((m(xte) - ref).norm() / ref.norm())
            rep = calibrate_(m, [xtr[:128], xtr[128:256]], alternate=alternate, heldout=[xte[:64]], progress=False)
            with torch.no_grad():
                after = float((m(xte) - ref).norm() / ref.norm())
            assert len(rep.layers) == 5
            for row in rep.layers:
                assert row.rel_err_after < row.rel_err_before
                assert row.sqnr_db_after > row.sqnr_db_before
                assert row.rel_err_heldout_after < row.rel_err_heldout_before  # not only on the fitted rows
                assert all(b[1] <= a[1] * (1 + 1e-6) for a, b in zip(row.history, row.history[1:]))  # monotone
            assert after < 0.95 * before, (seed, alternate, before, after)
            errs[(seed, alternate)] = after
            assert "blocks.0.fc1" in rep.table() and '"sqnr_db_after"' in rep.to_json()
    for seed in (0, 1):
        assert errs[(seed, 1)] < errs[(seed, 0)]


def test_reference_model_and_dense_weight_buffer_agree(vit):
    dense, xtr, _ = vit
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    strassenify_(a, STLConfig())
    strassenify_(b, STLConfig(keep_dense_weight=False))
    with pytest.raises(ValueError, match="no dense_weight buffer and no reference"):
        calibrate_(b, [xtr[:64]], progress=False)
    ra = calibrate_(a, [xtr[:64]], progress=False)
    rb = calibrate_(b, [xtr[:64]], reference=dense, progress=False)
    for la, lb in zip(ra.layers, rb.layers):
        assert la.rel_err_after == pytest.approx(lb.rel_err_after, rel=1e-6)
    # one-pass mode on the reference model's activations also helps every layer
    c = copy.deepcopy(dense)
    strassenify_(c, STLConfig())
    rc = calibrate_(c, [xtr[:64]], reference=dense, sequential=False, progress=False)
    assert all(r.rel_err_after < r.rel_err_before for r in rc.layers)


def test_calibrate_input_errors():
    m = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="no STLinear"):
        assert calibrate_(m, [torch.randn(2, 4, 8)], progress=False).layers == []
    strassenify_(m, STLConfig(), head=None)
    assert isinstance(m[0], STLinear)
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate_(m, [], progress=False)
    with pytest.raises(KeyError, match="not STLinear"):
        calibrate_(m, [torch.randn(2, 4, 8)], layers=["x"], progress=False)
