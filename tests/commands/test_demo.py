import json

from strassenkit.cli import main


def test_demo_runs_end_to_end_and_writes_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--epochs", "1", "--seeds", "0", "1", "--dim", "16", "--depth", "1", "--repeats", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| dense |" in text and "| stl |" in text
    data = json.loads((out / "summary.json").read_text())
    runs = data["runs"]
    assert {(r["model"], r["seed"]) for r in runs} == {("dense", 0), ("stl", 0), ("dense", 1), ("stl", 1)}
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["forward_ratio_vs_dense"] > 0
    stl = next(r for r in runs if r["model"] == "stl")
    dense = next(r for r in runs if r["model"] == "dense")
    assert stl["macs_encode_decode"] > 0 and dense["macs_encode_decode"] == 0
    assert stl["dense_macs"] == dense["macs"]
