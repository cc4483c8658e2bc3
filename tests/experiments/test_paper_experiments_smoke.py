import json
import math
import random

import pytest
import torch

from strassenkit.nn.phase import set_phase
from strassenkit.nn.spn import SPNLinear

from experiments import run as runner
from experiments.common import arithmetic_costs, merge_runs, model_bits, write_runs
from experiments.minilm import prune_24, spearman
from experiments.models.bert import BertConfig, BertEncoder


def _text_dir(tmp_path):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "my", "lord", "good", "night"]
    for name in ("one", "two", "three"):
        lines = [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(80)]
        (tmp_path / f"{name}_gut.txt").write_text("\n".join(lines))
    return tmp_path


def test_charlm_quick_smoke_writes_records_and_plot(tmp_path):
    (tmp_path / "texts").mkdir()
    text = _text_dir(tmp_path / "texts")
    out = tmp_path / "out"
    rc = runner.main(["charlm", "--quick", "--text-root", str(text), "--val-works", "two", "--out", str(out),
                     "--steps", "6", "--hidden", "16", "--seq-len", "16", "--val-chars", "1500"])
    assert rc == 0
    data = json.loads((out / "runs.json").read_text())
    runs = data["runs"]
    assert {r["model"] for r in runs} == {"dense", "spn@0.5"}
    assert all(r["seed"] == 0 and math.isfinite(r["val_bits_per_char"]) and r["val_bits_per_char"] > 0 for r in runs)
    dense, spn = sorted(runs, key=lambda r: r["model"])
    assert spn["mults_per_char"] < dense["mults_per_char"] / 10  # ternary SPN: r products per layer and char
    assert spn["model_bits"] < dense["model_bits"]
    assert (out / "bpc_vs_mults.png").stat().st_size > 1000
    assert "quick" in data["meta"]["config"] and data["meta"]["scale"]


def test_spn_model_bits_and_arithmetic_costs_match_hand_count():
    torch.manual_seed(0)
    layer = SPNLinear(6, 5, rank=3, bias=False)
    set_phase(layer, "ternary")
    x = torch.randn(7, 6)
    vb, _ = layer.ternary_parts("w_b")
    vc, _ = layer.ternary_parts("w_c")
    adds = 7 * (int((vb != 0).sum(1).clamp(min=1).sub(1).sum()) + int((vc != 0).sum(1).clamp(min=1).sub(1).sum()))
    assert model_bits(layer) == 2 * (18 + 15) + 64 + 32 * 3  # ternary w_b, w_c (+ scales), a_hat in fp32
    total = arithmetic_costs(layer, x)  # strassenkit.cost's SPN counter
    assert 7 * 3 <= total["mults"] <= 7 * (3 + 5 + 3) and total["adds"] >= adds


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    b = a + 0.5 * b
    assert abs(spearman(a, b) - scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic) < 1e-10
    assert spearman(a, a) == pytest.approx(1.0)


def test_prune_24_keeps_two_largest_of_every_four():
    torch.manual_seed(0)
    m = BertEncoder(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=16))
    pruned, masks = prune_24(m)
    for name in m.linear_names():
        w0, w = m.get_submodule(name).weight, pruned.get_submodule(name).weight
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()
        kept = w0.abs().reshape(w.shape[0], -1, 4).topk(2, -1).values.sum()
        assert torch.isclose(w.abs().sum(), kept)
    assert len(masks) == 6


def test_merge_runs_replaces_same_seed_and_model(tmp_path):
    write_runs(tmp_path, [{"seed": 0, "model": "a", "v": 1}, {"seed": 1, "model": "a", "v": 2}], {"config": {"x": 1}})
    merged, meta = merge_runs(tmp_path, [{"seed": 0, "model": "a", "v": 9}], {"config": {"x": 2}})
    assert sorted((r["seed"], r["v"]) for r in merged) == [(0, 9), (1, 2)]
    assert meta["previous_configs"] == [{"x": 1}]
    with pytest.raises(ValueError, match="seed"):
        write_runs(tmp_path, [{"model": "a"}], {})


def test_calibration_batches_have_no_padding():
    try:
        from experiments.data.minilm import Tokenizer

        tok = Tokenizer()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"all-MiniLM-L6-v2 tokenizer not installed (make data): {e}")
    from experiments.minilm import equal_length_batches

    sents = ["A man is playing a guitar.", "Someone plays.", "The cat sat on the mat.", "A dog runs.",
             "Good night, sweet prince, and flights of angels sing thee to thy rest."]
    batches = equal_length_batches(tok, sents, max_length=12, batch_size=2)
    assert sum(len(ids) for ids, _ in batches) == len(sents)
    for ids, mask in batches:
        assert bool(mask.all()) and ids.shape[1] <= 12


def test_report_reconstructs_commands_and_marks_missing_runs(tmp_path):
    from experiments.report import build_report, command_from_config

    cfg = {"quick": True, "seeds": [0, 1], "steps": 250, "ratios": [0.5], "out": "results/charlm", "append": False}
    assert command_from_config("charlm", cfg) == "python experiments/run.py charlm --quick --seeds 0 1 --ratios 0.5"
    text = build_report(tmp_path)
    assert text.count("_Not run yet") == 4
