"""strassenkit bench: row arithmetic, break-even logic, and the files the command writes."""

import argparse
import json

import pytest
import torch

from strassenkit.commands import bench


def test_bench_row_fields_are_consistent():
    row = bench.bench_row("t", 64, 32, 48, "float32", "train", 1, repeats=1, warmup=1)
    assert row.dense_ms > 0 and row.stl_ms > 0 and row.core_ms > 0
    assert row.speedup == pytest.approx(row.dense_ms / row.stl_ms)
    assert row.bmm_bound == pytest.approx(row.dense_ms / row.core_ms)
    assert row.flop_bound == pytest.approx(64 / 24)  # multiples of 4: exactly t^3 / r
    assert 0.0 <= row.outside_core_share < 1.0


def test_flop_bound_counts_padding():
    row = bench.bench_row("t", 6, 5, 5, "float32", "forward", 1, repeats=1, warmup=0)
    assert row.flop_bound == pytest.approx(6 * 5 * 5 / (24 * 2 * 2 * 2))


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        bench.bench_row("t", 8, 8, 8, "float32", "backward", 1)


def _row(M, speedup, mode="forward", dtype="float32"):
    return bench.BenchRow("square", M, M, M, dtype, dtype, mode, 1, 1.0, 1.0 / speedup, 0.5, speedup, 2.67, 2.0, 0.5, 1)


def test_break_even_is_first_size_from_which_all_larger_win():
    rows = [_row(512, 0.5), _row(1024, 1.1), _row(2048, 0.9), _row(4096, 1.5), _row(512, 0.2, "train")]
    be = bench._break_even(rows)
    assert be["float32/forward"] == "square 4096^3"
    assert be["float32/train"] == "not reached up to 512^3"


def test_run_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK_SETS", {"square": [(32, 32, 32, ("float32", "bfloat16"), (1,))]})
    args = argparse.Namespace(quick=True, sets=None, modes="forward,train", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path))
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert len(data["rows"]) == 4 and {r["dtype"] for r in data["rows"]} == {"float32", "bfloat16"}
    assert "torch" in data["machine"] and "cpu" in data["machine"]
    for r in data["rows"]:  # the dense-in-compute-dtype baseline exists exactly when STL upcasts
        assert (r["speedup_vs_upcast"] is not None) == (r["compute_dtype"] != r["dtype"])
    md = (tmp_path / "bench_quick.md").read_text()
    assert md.count("| square | 32x32x32 |") == 4
    assert (tmp_path / "speedup_quick.png").stat().st_size > 1000


def test_unknown_set_rejected(tmp_path):
    args = argparse.Namespace(quick=True, sets="nope", modes="forward", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path))
    with pytest.raises(SystemExit, match="unknown shape set"):
        bench.run(args)


def test_kernels_option_times_each_backend(tmp_path, monkeypatch):
    from strassenkit.functional import native

    monkeypatch.setattr(bench, "QUICK_SETS", {"square": [(32, 32, 32, ("float32",), (1,))]})
    args = argparse.Namespace(
        quick=True, sets=None, modes="forward", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path), kernels="native,torch"
    )
    if not native.available():
        with pytest.raises(RuntimeError, match="native"):
            bench.run(args)
        return
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert [r["kernels"] for r in data["rows"]] == ["native", "torch"]
    assert "--kernels native,torch" in data["command"]
    assert "THP_MEM_ALLOC_ENABLE" in data["machine"]


def test_bad_kernels_option_rejected(tmp_path):
    args = argparse.Namespace(
        quick=True, sets=None, modes="forward", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path), kernels="cuda"
    )
    with pytest.raises(SystemExit, match="kernels"):
        bench.run(args)


def test_ratio_spread_is_min_max_of_same_repeat_ratios():
    assert bench._ratio_spread([2.0, 3.0, 4.0], [1.0, 1.0, 4.0]) == (1.0, 3.0)
    row = bench.bench_row("t", 64, 32, 48, "float32", "forward", 1, repeats=3, warmup=0)
    assert row.speedup_min <= row.speedup_max
    assert row.speedup_min > 0


def test_runs_option_repeats_rows_and_summarizes(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK_SETS", {"square": [(32, 32, 32, ("float32",), (1,))]})
    args = argparse.Namespace(
        quick=True, sets=None, modes="forward", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path), runs=2
    )
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert [r["run"] for r in data["rows"]] == [0, 1]
    md = (tmp_path / "bench_quick.md").read_text()
    assert "Across the 2 runs" in md and "--runs 2" in md


def test_malloc_option_times_each_setting_and_restores_the_allocator(tmp_path, monkeypatch):
    from strassenkit import runtime

    monkeypatch.setattr(bench, "QUICK_SETS", {"square": [(32, 32, 32, ("float32",), (1,))]})
    args = argparse.Namespace(
        quick=True, sets=None, modes="forward", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path),
        malloc="default,retain",
    )
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert [r["malloc"] for r in data["rows"]] == ["default", "retain"]
    assert "--malloc default,retain" in data["command"]
    assert "| retain |" in (tmp_path / "bench_quick.md").read_text()
    assert not runtime.freed_memory_retained()  # the bench leaves the process as it found it


def test_bad_malloc_option_rejected(tmp_path):
    args = argparse.Namespace(
        quick=True, sets=None, modes="forward", threads=None, repeats=1, tile=4, rank=24, out=str(tmp_path), malloc="jemalloc"
    )
    with pytest.raises(SystemExit, match="malloc"):
        bench.run(args)


def test_model_sets_time_a_converted_model_and_the_per_call_cost(tmp_path, monkeypatch):
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        return model, torch.randn(2, 8, 16), 0, 1.0, "2 linears"

    monkeypatch.setitem(bench._MODELS, "vit_b", tiny)
    monkeypatch.setitem(bench.MODEL_SETS, "models", ["vit_b"])
    real_call_rows = bench.call_rows
    monkeypatch.setattr(bench, "call_rows", lambda repeats, set_name: real_call_rows(5, set_name))
    args = argparse.Namespace(quick=False, sets="models,overhead", modes="forward,train", threads="1", repeats=1,
                              tile=4, rank=24, out=str(tmp_path))
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["rows"] == []
    got = {(r["set"], r["mode"]) for r in data["model_rows"]}
    assert got == {("models", "forward"), ("models", "train"), ("overhead", "forward"), ("overhead", "train")}
    for r in data["model_rows"]:
        assert r["dense_ms"] > 0 and r["stl_ms"] > 0
        if r["set"] == "models":
            assert r["linears"] == 2 and r["flop_bound"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "## Whole models and per-call cost" in md and "native STL kernels: code path" in md
    assert "Across the" not in md


def test_model_goal_is_judged_on_the_median_over_runs():
    rows = [bench.ModelRow(set="models", model="vit_b", shape="s", mode="forward", threads=2, dense_ms=1.0, stl_ms=1.0,
                           speedup=v, speedup_min=v, speedup_max=v, flop_bound=2.2, linears=1, repeats=1,
                           kernels="native", run=i, goal=2.0) for i, v in enumerate((2.1, 1.9, 1.95))]
    md = "\n".join(bench._model_markdown(rows))
    assert "| models | vit_b | forward | 2 | default | 2.10, 1.90, 1.95 | **1.95x** | >= 2.0x: missed |" in md
    rows[1].speedup = 2.05
    assert ">= 2.0x: **met** |" in "\n".join(bench._model_markdown(rows)).split("Across the")[1]

