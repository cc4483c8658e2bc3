"""vit and spn_cnn (issue #18): --quick smoke runs on a small fake Fashion-MNIST, --append batches, presets."""

import argparse
import gzip
import json
import struct

import numpy as np
import pytest

from experiments import run as runner
from experiments import spn_cnn, vit
from experiments.common import verdict_line


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """160 train / 60 test images whose class is a bright 7x7 square at one of 10 places (learnable fast)."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(y):
            r, col = divmod(int(c), 4)
            x[i, 7 * r: 7 * r + 7, 7 * col: 7 * col + 7] += 180
        return x, y

    (xtr, ytr), (xte, yte) = make(160), make(60)
    _write_idx(root / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(root / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(root / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", yte)
    return root


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args(argv)
    module.resolve_args(args)
    return args


def test_presets_full_is_the_issue_budget_and_small_the_earlier_run():
    full = _args(vit, [])
    assert (full.budget, full.train_limit, full.epochs, full.depth, full.out) == ("full", 60000, 10, 4, "results/vit/full")
    assert len([full.lr, *full.dense_lrs]) >= 3 and full.dense_dims == ["matched"] and full.codec_lr_mults
    small = _args(vit, ["--budget", "small"])
    assert (small.train_limit, small.epochs, small.depth, small.dim, small.out) == (8000, 3, 2, 128, "results/vit")
    assert _args(vit, ["--epochs", "12"]).epochs == 12  # explicit options win over the preset
    kinds = vit.model_kinds(full, ["random", "als", "truncate"])
    assert {"dense@lr=0.001", "dense@lr=0.004", "stl-random", "stl-als", "lowrank", "stl-als@codec=0.1",
            "stl-random@lr=0.004"} <= set(kinds)
    c = _args(spn_cnn, [])
    assert (c.train_limit, c.epochs, c.kd) == (60000, 10, "both")
    assert {spn_cnn.parse_budget(b)[0] for b in c.budgets} == {1, 2}
    assert {spn_cnn.parse_budget(b)[2] for b in c.budgets} == {1, 4}
    assert spn_cnn.parse_budget("2:1") == (2, 1.0, 1) and spn_cnn.spn_rank(0.5, 32, 4) == 16
    with pytest.raises(ValueError, match="OUT_PATCH"):
        spn_cnn.parse_budget("2")


def test_report_commands_of_old_and_new_configs():
    from experiments.report import command_from_config

    old = {"quick": False, "seeds": [0, 1, 2], "train_limit": 8000, "epochs": 3, "batch_size": 128, "lr": 0.002,
           "dim": 128, "depth": 2, "heads": 4, "patch": 7, "tile": 4, "rank": 24, "dense_lrs": [0.001],
           "only": ["dense@lr=0.001"], "out": "results/vit", "append": True}
    assert command_from_config("vit", old) == ("python experiments/run.py vit --budget small --dense-lrs 0.001 "
                                               "--only dense@lr=0.001 --append")
    new = vars(_args(vit, ["--only", "lowrank", "--seeds", "1", "--append"]))
    assert command_from_config("vit", new) == "python experiments/run.py vit --seeds 1 --only lowrank --append"


def test_vit_quick_smoke_with_lr_check_and_append(fmnist, tmp_path):
    out = tmp_path / "vit"
    common = ["vit", "--quick", "--data-root", str(fmnist), "--out", str(out), "--dim", "16", "--depth", "1",
              "--heads", "2", "--inits", "random", "truncate", "--lr-check-inits", "random", "--dense-dims",
              "matched", "--dense-lrs", "0.004", "--stl-lrs", "--codec-lr-mults", "0.1"]
    assert runner.main(common + ["--only", "dense", "stl-random", "stl-random@codec=0.1", "dense@dim=matched"]) == 0
    assert runner.main(common + ["--only", "lowrank", "stl-truncate", "--append"]) == 0
    data = json.loads((out / "runs.json").read_text())
    runs = {r["model"]: r for r in data["runs"]}
    assert set(runs) == {"dense", "stl-random", "stl-random@codec=0.1", "lowrank", "stl-truncate",
                         next(k for k in runs if k.startswith("dense@dim="))}
    assert all(r["seed"] == 0 and r["budget"] == "full" and 0 <= r["test_accuracy"] <= 1 for r in runs.values())
    assert runs["stl-random@codec=0.1"]["codec_lr_mult"] == 0.1 and runs["lowrank"]["train_ratio_vs_dense"] is None
    assert len(data["meta"]["previous_configs"]) == 1
    assert (out / "accuracy_vs_macs.png").stat().st_size > 1000
    assert "stl-truncate" in vit.table(data["runs"])


def test_vit_row_mixing_control_keeps_the_core_macs_and_never_mixes_tokens():
    import torch

    from strassenkit import cost
    from strassenkit.nn import STLinear

    args = _args(vit, [])
    assert "stl-random@rows=1" in vit.model_kinds(args, ["random"])
    assert "stl-random@rows=1" not in vit.model_kinds(_args(vit, ["--budget", "small"]), ["random"])
    mixed, strips = vit.build("stl-random", args, 0, 16), vit.build("stl-random@rows=1", args, 0, 16)
    layers = [m for m in strips.modules() if isinstance(m, STLinear)]
    assert layers and all(m.row_tile == 1 and m.rank == 6 for m in layers)
    x = torch.randn(2, 28, 28)
    core = [sum(r.macs_core for r in cost.count(m, x).layers if r.kind == "stl") for m in (mixed, strips)]
    assert core[0] == core[1]
    with torch.no_grad():  # a token's output does not depend on the other tokens of its 4-row tile
        tokens = torch.randn(2, 16, args.dim)
        first = strips.blocks[0].fc1(tokens)
        changed = tokens.clone()
        changed[:, 1] += 1.0
        assert torch.equal(strips.blocks[0].fc1(changed)[:, 0], first[:, 0])
    with pytest.raises(ValueError, match="rows"):
        vit.build("stl-random@rows=0", args, 0, 16)


def test_vit_codec_param_groups_scale_only_enc_x_and_dec():
    import torch

    from strassenkit.nn import STLinear

    model = torch.nn.Sequential(STLinear(8, 8, tile=4, rank=24), torch.nn.Linear(8, 2))
    assert vit.param_groups(model, 1.0) is None
    base, codec = vit.param_groups(model, 0.1)
    assert {id(p) for p in codec["params"]} == {id(model[0].enc_x), id(model[0].dec)} and codec["lr_scale"] == 0.1
    assert len(base["params"]) + len(codec["params"]) == len(list(model.parameters()))


def test_spn_cnn_quick_smoke_kd_batches_share_the_saved_teacher(fmnist, tmp_path):
    out = tmp_path / "cnn"
    common = ["spn_cnn", "--quick", "--data-root", str(fmnist), "--out", str(out), "--width", "4",
              "--budgets", "1:0.5:1", "2:1:4", "--dense-widths", "8"]
    assert runner.main(common + ["--only", "dense", "spn@1:0.5:1", "--kd", "off"]) == 0
    assert list((out / "work").glob("teacher-dense-s0-*.pt"))
    assert runner.main(common + ["--only", "spn@2:1:4", "dense@width=8", "--kd", "on", "--append"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    got = {(r["model"], r["kd"]) for r in runs}
    assert got == {("dense", False), ("spn@1:0.5:1", False), ("spn@2:1:4", True), ("dense@width=8", False)}
    spn = next(r for r in runs if r["model"] == "spn@2:1:4")
    dense = next(r for r in runs if r["model"] == "dense")
    assert (spn["out_patch"], spn["groups"]) == (2, 4) and spn["conv_mults"] < dense["conv_mults"] / 50
    assert (out / "accuracy_vs_cost.png").stat().st_size > 1000


@pytest.mark.parametrize("kind", ["dense", "spn@1:2:1", "spn@2:1:4"])
def test_spn_cnn_models_are_channels_last_and_compute_the_same(kind):
    import copy

    import torch

    args = _args(spn_cnn, ["--width", "8"])
    model = spn_cnn.build(kind, args, 0).double()
    convs = [m.weight if hasattr(m, "weight") else m.w_b for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) or hasattr(m, "w_b")]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), plain.eval()(x), rtol=1e-10, atol=1e-12)


def test_verdicts_from_values():
    assert verdict_line("x", [0.9, 0.91, 0.92], [0.9, 0.905, 0.91], kind="at_least", margin=0.005)[0] == "confirmed"
    assert verdict_line("x", [0.80, 0.81, 0.80], [0.9, 0.905, 0.91], kind="at_least", margin=0.005)[0] == "refuted"
    assert verdict_line("x", [0.9], [0.9, 0.91], kind="better", margin=0.005)[0] == "pending"
    assert verdict_line("x", [0.95, 0.951, 0.952], [0.9, 0.901, 0.90], kind="better", margin=0.005)[0] == "confirmed"
    assert verdict_line("x", [0.90, 0.901, 0.90], [0.9, 0.901, 0.90], kind="better", margin=0.005)[0] == "refuted"
    assert verdict_line("x", [0.90, 0.95, 0.85], [0.9, 0.901, 0.90], kind="better", margin=0.005)[0] == "inconclusive"
    v, line = verdict_line("ppl", [100, 101], [120, 121], kind="better", margin=1, higher_is_better=False, digits=1)
    assert v == "confirmed" and "100.5 vs 120.5" in line


def test_progress_writes_keep_history_once(tmp_path):
    from experiments.common import finish, read_runs, save_progress, write_runs

    write_runs(tmp_path, [{"seed": 0, "model": "old"}], {"config": {"c": 0}})
    args = argparse.Namespace(append=True, out=str(tmp_path))
    save_progress(args, [{"seed": 0, "model": "a"}], {"config": {"c": 1}})
    assert read_runs(tmp_path)["meta"]["in_progress"]
    save_progress(args, [{"seed": 0, "model": "a"}, {"seed": 1, "model": "a"}], {"config": {"c": 1}})
    finish(args, [{"seed": 0, "model": "a"}, {"seed": 1, "model": "a"}], {"config": {"c": 1}},
           lambda r, o: None, lambda r: "")
    data = read_runs(tmp_path)
    assert sorted((r["seed"], r["model"]) for r in data["runs"]) == [(0, "a"), (0, "old"), (1, "a")]
    assert data["meta"]["previous_configs"] == [{"c": 0}] and "in_progress" not in data["meta"]


def test_plot_only_redraws_the_budget_folder(tmp_path, monkeypatch):
    from pathlib import Path

    seen = []
    monkeypatch.setattr(spn_cnn, "plot", lambda runs, out: seen.append(Path(out)) or out)
    monkeypatch.setattr(spn_cnn, "table", lambda runs: "")
    monkeypatch.setattr(runner.common, "read_runs", lambda out: {"runs": []})
    assert runner.main(["spn_cnn", "--plot-only"]) == 0
    assert runner.main(["spn_cnn", "--plot-only", "--budget", "small"]) == 0
    assert runner.main(["spn_cnn", "--plot-only", "--out", str(tmp_path)]) == 0
    assert seen == [Path("results/spn_cnn/full"), Path("results/spn_cnn"), tmp_path]
