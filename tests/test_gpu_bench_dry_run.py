"""``benchmarks/gpu.py --dry-run``: every code path of the GPU benchmark at tiny sizes on the CPU.

The dry run times the same rows as the GPU run (r=24 and the exact r=49, forward and training step,
Triton kernels in the interpreter and the PyTorch path), writes gpu.{json,md} to the folder given
(never to results/), and checks the exact codec against F.linear. The test runs two of the six shapes
(one square, one with ragged tiles: 197 -> 13 rows): the others differ only in size, and Triton's
interpreter is slow.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_exercises_every_row_and_writes_only_to_out(tmp_path):
    results = ROOT / "results" / "bench"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu.*")} if results.exists() else {}
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    shapes = ["square_4096", "vit_b_mlp_fc1"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--shapes", ",".join(shapes)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = {p.name: p.stat().st_mtime_ns for p in results.glob("gpu.*")} if results.exists() else {}
    assert after == before, "the dry run must not touch results/bench"
    assert not (tmp_path / "results").exists()

    res = json.loads((out / "gpu.json").read_text())
    md = (out / "gpu.md").read_text()
    mod = _load_module()
    kernels = ["triton", "torch"] if HAVE_TRITON else ["torch"]
    rows = res["rows"]
    assert len(rows) == len(shapes) * 2 * 2 * len(kernels) and not res["skipped"]
    assert {(r["shape"], r["rank"], r["mode"], r["kernels"]) for r in rows} == {
        (s, r, m, k) for s in shapes for r in (24, 49) for m in ("forward", "train") for k in kernels}
    assert set(mod.DRY_SHAPES) == set(mod.SHAPES)  # every GPU shape has a tiny stand-in
    for r in rows:
        assert "error" not in r, r
        for key in ("dense_ms", "stl_ms", "core_ms", "speedup", "flop_bound", "core_bound", "outside_core_share"):
            assert r[key] > 0 or key == "outside_core_share", (key, r)
        assert 0.0 <= r["outside_core_share"] <= 1.0
        if r["mode"] == "forward":
            assert r["encode_ms"] > 0 and r["decode_ms"] > 0
        if r["rank"] == 49:
            assert r["exact_rel_err"] < 2e-2, r  # bf16 rounding of an exact algorithm
        assert r["flop_bound"] <= (2.67 if r["rank"] == 24 else 1.31) + 1e-2  # padding only lowers it
    square = next(r for r in rows if r["shape"] == "square_4096" and r["rank"] == 24)
    assert abs(square["flop_bound"] - 64 / 24) < 1e-9  # no padding at 16^3
    assert res["device"]["torch"] and "gpu" in res["device"] and "cuda" in res["device"]
    assert res["goal"]["verdict"].startswith("not measured")
    assert "dry run" in md and md.count("\n| ") == len(rows) + 1  # header + one line per row


def test_refuses_to_run_without_a_gpu_unless_dry_run(monkeypatch):
    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        _load_module().main([])
