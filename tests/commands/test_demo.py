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
        assert r["forward_ratio_vs_dense"] > 0 and r["train_step_ratio_vs_dense"] > 0
    stl = next(r for r in runs if r["model"] == "stl")
    dense = next(r for r in runs if r["model"] == "dense")
    assert stl["macs_encode_decode"] > 0 and dense["macs_encode_decode"] == 0
    assert stl["dense_macs"] == dense["macs"]


def test_demo_keeps_embedding_and_head_dense_by_default():
    import argparse

    from torch import nn

    from strassenkit.commands.demo import build_model
    from strassenkit.nn import STLinear

    args = argparse.Namespace(tile=4, rank=24, init="random", dim=16, depth=1, stl_layers="blocks")
    stl = build_model("stl", args, 0)
    assert type(stl.patch_embed) is nn.Linear and type(stl.head) is nn.Linear
    assert all(isinstance(m, STLinear) for m in (stl.blocks[0].attn.qkv, stl.blocks[0].attn.proj, stl.blocks[0].fc1,
                                                  stl.blocks[0].fc2))
    args.stl_layers = "all"
    every = build_model("stl", args, 0)
    assert isinstance(every.patch_embed, STLinear) and isinstance(every.head, STLinear)
    assert all(type(m) is nn.Linear for m in build_model("dense", args, 0).modules() if isinstance(m, nn.Linear))
