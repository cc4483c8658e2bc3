"""A tiny run of the tile-approximation study (experiments/approx.py): records, exact cases, MC check, plot."""

import argparse
import json
import math

import pytest

from experiments import approx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    os.environ.setdefault("STRASSENKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    return approx.run_study(
        ranks=(8, 49), families=("truncate", "random"), seeds=1, steps=5, vit_epochs=0,
        gauss_eval=1024, gauss_batch=64, mc_samples=4000, n_train_images=4, n_test_images=8, progress=False,
    )


def test_records_complete_and_finite(tiny):
    recs = tiny["records"]
    assert {(r["family"], r["rank"]) for r in recs} == {("truncate", 8), ("truncate", 49), ("random", 8), ("random", 49)}
    keys = ("tensor_rel_sq", "gauss_mc_rel_sq", "gauss_mc_stderr", "gauss_refined_rel_sq", "real_init_rel_sq",
            "real_refined_rel_sq")
    for r in recs:
        for k in keys:
            assert math.isfinite(r[k]) and r[k] >= 0, (r["family"], r["rank"], k)
    json.dumps(tiny)  # serializable as written to summary.json


def test_exact_truncate_has_zero_error_everywhere(tiny):
    r = next(x for x in tiny["records"] if x["family"] == "truncate" and x["rank"] == 49)
    assert r["tensor_rel_sq"] == 0.0
    assert r["gauss_mc_rel_sq"] < 1e-20 and r["real_init_rel_sq"] < 1e-20


def test_monte_carlo_matches_tensor_residual(tiny):
    for r in tiny["records"]:
        if r["tensor_rel_sq"] > 0:
            assert abs(r["gauss_mc_rel_sq"] - r["tensor_rel_sq"]) < 5 * r["gauss_mc_stderr"], r


def test_refinement_helps_a_bad_init(tiny):
    r = next(x for x in tiny["records"] if x["family"] == "random" and x["rank"] == 49)
    assert r["real_refined_rel_sq"] < r["real_init_rel_sq"]


def test_headline_plot_and_report(tiny, tmp_path, capsys):
    h = tiny["headline"] = approx.headline(tiny["records"], rank=8)
    d = h["real_refined_rel_sq"]
    assert d["best_theory_family"] == "truncate" and d["random_median"] is not None
    approx.plot(tiny, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    approx.print_report(tiny)
    out = capsys.readouterr().out
    assert "HEADLINE r=8" in out and "truncate" in out
    approx.write_markdown(tiny, tmp_path / "README.md")
    md = (tmp_path / "README.md").read_text()
    assert "| truncate | 49 |" in md and "## Headline" in md


def test_search_success_rate_report(tmp_path):
    assert approx.run_search("2x2x2r7:3", tmp_path) == 0
    rec = json.loads((tmp_path / "search.json").read_text())["<2,2,2;7>"]
    assert rec["tries"] == 3 and 0 <= rec["successes"] <= 3 and len(rec["statuses"]) == 3
    with pytest.raises(SystemExit, match="parse"):
        approx.run_search("2x2x2:3", tmp_path)


def test_cli_rejects_unknown_family():
    p = argparse.ArgumentParser()
    approx.add_arguments(p)
    with pytest.raises(SystemExit, match="families"):
        approx.run(p.parse_args(["--families", "nope", "--out", "/nonexistent"]))
