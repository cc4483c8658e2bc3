import json
import math
import random

import pytest
import torch

from strassenkit.nn.phase import set_phase
from strassenkit.nn.spn import SPNLinear

from experiments import run as runner
from experiments.common import arithmetic_costs, merge_runs, model_bits, runs_lock, store_runs, write_runs
from experiments.minilm import block_linears, fix_masks, lowrank, prune_24, spearman, unfix_masks


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


def _tiny_hf_bert(vocab=60):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_prune_24_keeps_two_largest_of_every_four_and_the_mask_survives_training():
    m = _tiny_hf_bert()
    names = block_linears(m)
    assert len(names) == 6
    pruned, masks = prune_24(m)
    for name in names:
        w0, w = m.get_submodule(name).weight, pruned.get_submodule(name).weight
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()
        kept = w0.abs().reshape(w.shape[0], -1, 4).topk(2, -1).values.sum()
        assert torch.isclose(w.abs().sum(), kept)
    assert len(masks) == 6
    fix_masks(pruned, masks)
    opt = torch.optim.AdamW(pruned.parameters(), lr=1e-2)
    ids = torch.randint(1, 60, (2, 7))
    for _ in range(2):
        opt.zero_grad()
        pruned(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
    unfix_masks(pruned, masks)
    for name in names:
        w = pruned.get_submodule(name).weight
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_lowrank_is_the_truncated_svd_at_the_matched_flops():
    m = _tiny_hf_bert()
    low, ranks = lowrank(m, 2.0)
    for name in block_linears(m):
        lin, lr = m.get_submodule(name), low.get_submodule(name)
        K, N = lin.in_features, lin.out_features
        assert ranks[name] == round(K * N / (2 * (K + N)))
        s = torch.linalg.svdvals(lin.weight.double())
        approx = lr[1].weight.double() @ lr[0].weight.double()
        err = torch.linalg.matrix_norm(approx - lin.weight.double())
        assert float(err) == pytest.approx(float(s[ranks[name]:].norm()), rel=1e-5)  # Eckart-Young optimum


def test_merge_runs_replaces_same_seed_and_model(tmp_path):
    write_runs(tmp_path, [{"seed": 0, "model": "a", "v": 1}, {"seed": 1, "model": "a", "v": 2}], {"config": {"x": 1}})
    merged, meta = merge_runs(tmp_path, [{"seed": 0, "model": "a", "v": 9}], {"config": {"x": 2}})
    assert sorted((r["seed"], r["v"]) for r in merged) == [(0, 9), (1, 2)]
    assert meta["previous_configs"] == [{"x": 1}]
    with pytest.raises(ValueError, match="seed"):
        write_runs(tmp_path, [{"model": "a"}], {})


def test_store_runs_waits_for_the_lock_and_keeps_the_other_writers_records(tmp_path):
    import threading
    import types

    args = types.SimpleNamespace(out=tmp_path, append=True)
    store_runs(args, [{"seed": 0, "model": "a"}], {"config": {}})
    done = threading.Event()
    with runs_lock(tmp_path):  # another call is writing: this one must wait, then merge with what it wrote
        t = threading.Thread(target=lambda: (store_runs(args, [{"seed": 0, "model": "b"}], {"config": {}}), done.set()))
        t.start()
        assert not done.wait(0.3)
        write_runs(tmp_path, [{"seed": 0, "model": "a"}, {"seed": 0, "model": "c"}], {"config": {}})
    t.join(10)
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert sorted(r["model"] for r in runs) == ["a", "b", "c"]
    assert not list(tmp_path.glob("*.tmp"))


def _minilm_tokenizer_dir():
    try:
        from experiments.minilm import model_dir

        return model_dir()
    except (FileNotFoundError, ImportError):
        return None


def test_length_batches_sort_by_length_and_keep_every_sentence():
    d = _minilm_tokenizer_dir()
    if d is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (make data)")
    from experiments.minilm import length_batches, load_tokenizer

    tok = load_tokenizer()
    sents = ["A man is playing a guitar.", "Someone plays.", "The cat sat on the mat.", "A dog runs.",
             "Good night, sweet prince, and flights of angels sing thee to thy rest."]
    batches = length_batches(tok, sents, max_length=12, batch_size=2)
    assert sum(len(b["input_ids"]) for b in batches) == len(sents)
    lens = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lens == sorted(lens) and max(lens) == 12  # truncated to max_length, [SEP] kept
    for b in batches:  # right padding: the padding hook of strassenify_ needs it
        m = b["attention_mask"]
        assert bool((m[:, 1:] <= m[:, :-1]).all())


def test_minilm_quick_smoke_on_a_tiny_bert_writes_records_and_plot(tmp_path):
    """The whole pipeline (HF BertModel from a folder, 2:4, low rank, STL + calibrate_, distillation through
    strassenkit.train) on a tiny random BERT with the real tokenizer and a fake corpus."""
    d = _minilm_tokenizer_dir()
    if d is None:
        pytest.skip("all-MiniLM-L6-v2 tokenizer not installed (make data)")
    import shutil

    model = _tiny_hf_bert(vocab=30522)
    root = tmp_path / "model"
    model.save_pretrained(root)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (d / f).is_file():
            shutil.copy(d / f, root / f)
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "my", "lord", "good", "night"]
    for name in ("hamlet", "tempest", "sonnets", "one", "two"):
        lines = [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(300)]
        (texts / f"{name}_gut.txt").write_text("\n".join(lines))
    out = tmp_path / "out"
    rc = runner.main(["minilm", "--quick", "--minilm-root", str(root), "--text-root", str(texts), "--out", str(out),
                      "--work-dir", str(tmp_path / "work"), "--methods", "2:4", "lowrank@2.0", "stl-cal-r24"])
    assert rc == 0
    data = json.loads((out / "runs.json").read_text())
    runs = {r["model"]: r for r in data["runs"]}
    assert set(runs) == {"2:4", "lowrank@2.0", "stl-cal-r24"}
    assert runs["2:4"]["flop_reduction"] == pytest.approx(2.0)
    assert runs["lowrank@2.0"]["flop_reduction"] == pytest.approx(2.0, rel=0.05)
    stl = runs["stl-cal-r24"]
    # width 16: encode/decode cost more than the core saves; counted per sentence incl. enc/dec
    assert stl["linear_macs_encdec"] > 0 and stl["calib_rel_error_mean"] < 1.0 and len(stl["calib_layers"]) == 6
    assert all(r["seed"] == 0 and -1 <= r["cosine_mean"] <= 1 for r in runs.values())
    assert (out / "quality_vs_flops.png").stat().st_size > 1000
    # --append keeps earlier records and adds new ones
    rc = runner.main(["minilm", "--quick", "--minilm-root", str(root), "--text-root", str(texts), "--out", str(out),
                      "--work-dir", str(tmp_path / "work"), "--methods", "lowrank@2.5", "--append"])
    assert rc == 0
    assert {r["model"] for r in json.loads((out / "runs.json").read_text())["runs"]} == set(runs) | {"lowrank@2.5"}
    # the same STL conversion again (e.g. a learning-rate check): taken from the work dir, same student
    rc = runner.main(["minilm", "--quick", "--minilm-root", str(root), "--text-root", str(texts), "--out", str(out),
                      "--work-dir", str(tmp_path / "work"), "--methods", "stl-cal-r24", "--tag", "again", "--append"])
    again = {r["model"]: r for r in json.loads((out / "runs.json").read_text())["runs"]}["stl-cal-r24 again"]
    assert again["converted_from_cache"].startswith("converted-stl-cal-r24-s0-")
    assert again["before_distill"] == stl["before_distill"]


def test_report_reconstructs_commands_and_marks_missing_runs(tmp_path):
    from experiments.report import build_report, command_from_config

    cfg = {"quick": True, "seeds": [0, 1], "steps": 250, "ratios": [0.5], "out": "results/charlm", "append": False}
    assert command_from_config("charlm", cfg) == "python experiments/run.py charlm --quick --seeds 0 1 --ratios 0.5"
    text = build_report(tmp_path)
    assert text.count("_Not run yet") == 7  # vit/full, vit, spn_cnn/full, spn_cnn, wordlm, charlm, minilm


def test_minilm_pareto_front_headline_and_findings_from_records():
    from experiments.minilm import findings_lines, headline_table, pareto_front

    assert pareto_front([(2.0, 0.9), (2.0, 0.8), (2.5, 0.7), (2.4, 0.6), (3.0, 0.7)]) == [(2.0, 0.9), (3.0, 0.7)]

    def rec(model, seed, cos, sp, red=2.08):
        return {"model": model, "seed": seed, "cosine_mean": cos, "pair_spearman": sp, "flop_reduction": red}

    recs = [rec("stl-cal-r23 alt2-lr1e-3", s, 0.74 + 0.02 * (s - 1), 0.67) for s in range(3)]
    recs += [rec("stl-rr-r23 lr1e-3", 0, 0.80, 0.72), rec("stl-lw-r23 alt2-lr1e-3", 0, 0.75, 0.68),
             rec("plan@2.0 alt2-lr1e-3", 0, 0.70, 0.60, 2.02)]
    head = "\n".join(headline_table(recs))
    assert "| stl-cal-r23 alt2-lr1e-3 | 3 | 2.08x | 0.7400 ± 0.0200 |" in head and "stl-rr" not in head
    text = "\n".join(findings_lines(recs))
    assert "seed spread, the largest cosine std of a 3-seed method, here 0.020" in text
    rr = next(line for line in text.splitlines() if line.startswith("- (b) rank reduction") and "lr 1e-3" in line)
    assert rr.endswith(": helped.") and "(+0.060)" in rr
    lw = next(line for line in text.splitlines() if line.startswith("- (c)"))
    assert "within the seed spread" in lw  # +0.01 < 0.02 noise
    assert next(line for line in text.splitlines() if line.startswith("- planner's")).endswith(": hurt.")
    assert "ridge chosen" not in text  # pairs that were not run are left out


def test_minilm_plan_choices_are_counted_per_layer_kind():
    from experiments.minilm import plan_choice_lines

    names = [f"encoder.layer.{b}.{k}" for b in range(6) for k in ("attention.self.value", "intermediate.dense")]
    recs = [{"model": "plan@2.0 t", "seed": s, "flop_reduction": 2.0, "cosine_mean": 0.8, "pair_spearman": 0.7,
             "plan": {"choices": {n: ("dense" if "value" in n else ("t4r12" if b < 4 else "t4r16"))
                                  for n, b in zip(names, [i // 2 for i in range(12)])}}} for s in range(2)]
    text = "\n".join(plan_choice_lines(recs))
    assert "**plan@2.0 t** (2 seed(s), 12 layers per kind): value: dense x12; ffn-in: t4r12 x8, t4r16 x4." in text
