"""Hugging Face transformers models end to end: causal safety, padding safety, Conv1D, heads, save/load,
filter_fn / unload_ / PEFT conventions, calibration with masks. Tiny models built from configs (no downloads).

Every leak test is checked to fail with its safeguard switched off (the ``*_fails_without_*`` tests)."""

import warnings

import pytest
import torch

import strassenkit as sk
from strassenkit.surgery import record, targets

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen2Config, Qwen2Model)

V = 100


def _llama_cfg(**kw):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=V, **kw)


def _gpt2_cfg(**kw):
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=1, **kw)


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                     max_position_embeddings=64)
    return BertModel(cfg).eval()


DECODERS = {
    "LlamaModel": lambda: LlamaModel(_llama_cfg()),
    "LlamaForCausalLM": lambda: LlamaForCausalLM(_llama_cfg()),
    "GPT2Model": lambda: GPT2Model(_gpt2_cfg()),
    "GPT2LMHeadModel": lambda: GPT2LMHeadModel(_gpt2_cfg()),
    "Qwen2Model": lambda: Qwen2Model(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=V)),
}


def _out(model, ids, **kw):
    with torch.no_grad():
        o = model(input_ids=ids, **kw)
    return (o.logits if hasattr(o, "logits") else o.last_hidden_state).float()


def _max_change_before(model, j, seed=0):
    """Max |change| of outputs at positions < j when token j is edited."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (2, 12), generator=g)
    ids2 = ids.clone()
    ids2[:, j] = (ids2[:, j] + 7) % (V - 2) + 2
    return (_out(model, ids) - _out(model, ids2))[:, :j].abs().max().item()


# ------------------------------------------------------------------ causal safety
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoders_convert_with_row_tile_1_and_never_leak_the_future(name):
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    converted = sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    stl = [m for m in model.modules() if isinstance(m, sk.STLinear)]
    assert converted and len(stl) == len(converted)
    assert all(m.row_tile == 1 for m in stl)
    for j in (1, 3, 6, 11):
        assert _max_change_before(model, j) <= 1e-6


@pytest.mark.parametrize("name", ["LlamaModel", "GPT2Model"])
def test_causal_leak_test_fails_without_detection(name, monkeypatch):
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    monkeypatch.setattr(targets, "detect_causal", lambda m: (False, "switched off", True))
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    assert any(m.row_tile == 4 for m in model.modules() if isinstance(m, sk.STLinear))
    assert max(_max_change_before(model, j) for j in (1, 3, 6)) > 1e-3


def test_causal_detection_reasons():
    assert targets.detect_causal(LlamaModel(_llama_cfg()))[0]  # attention modules say is_causal=True
    assert "is_causal=True" in targets.detect_causal(LlamaModel(_llama_cfg()))[1]
    assert targets.detect_causal(GPT2LMHeadModel(_gpt2_cfg()))[0]
    bert = _bert()
    assert targets.detect_causal(bert)[:1] == (False,)
    bert_dec = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=V, is_decoder=True))
    assert targets.detect_causal(bert_dec)[0]


def test_unclear_hf_model_is_treated_as_causal_with_a_warning():
    class Unknown(torch.nn.Module):  # looks like an HF model: a config with a model_type, no other sign
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mystery"})()
            self.proj = torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.proj(x))

    m = Unknown()
    with pytest.warns(UserWarning, match="could not tell whether Unknown is causal"):
        sk.strassenify_(m, sk.STLConfig(tile=4, rank=8))
    assert m.proj.row_tile == 1
    m2 = Unknown()
    sk.strassenify_(m2, sk.STLConfig(tile=4, rank=8), causal=False)  # the user's word
    assert m2.proj.row_tile == 4


def test_causal_model_refuses_row_tile_above_1():
    with pytest.raises(ValueError, match="causal model but STLConfig\\(row_tile=4\\)"):
        sk.strassenify_(LlamaModel(_llama_cfg()), sk.STLConfig(tile=4, rank=24, row_tile=4))


# ------------------------------------------------------------------ Conv1D and heads
def test_gpt2_conv1d_converts_exactly_like_linear():
    torch.manual_seed(0)
    model = GPT2Model(_gpt2_cfg()).eval().double()
    ids = torch.randint(2, V, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    conv = sk.strassenify_(model, sk.STLConfig(tile=4, rank=16, init="schoolbook:1,4,4"))  # exact <1,4,4>
    assert sorted(c.rsplit(".", 1)[-1] for c in conv) == sorted(["c_attn", "c_proj", "c_fc", "c_proj"] * 2)
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
    assert torch.allclose(y, ref, rtol=0, atol=1e-10)


def test_heads_from_get_output_embeddings():
    bert = _bert()
    sk.strassenify_(bert, sk.STLConfig(tile=4, rank=24))
    assert isinstance(bert.pooler.dense, sk.STLinear)  # BertModel has no output head
    llama = LlamaModel(_llama_cfg())
    sk.strassenify_(llama, sk.STLConfig(tile=4, rank=24))
    assert isinstance(llama.layers[-1].mlp.down_proj, sk.STLinear)
    lm = LlamaForCausalLM(_llama_cfg())
    sk.strassenify_(lm, sk.STLConfig(tile=4, rank=24))
    assert type(lm.lm_head) is torch.nn.Linear and isinstance(lm.model.layers[-1].mlp.down_proj, sk.STLinear)


def test_tied_output_embeddings_are_never_converted():
    lm = GPT2LMHeadModel(_gpt2_cfg())
    assert lm.lm_head.weight is lm.transformer.wte.weight
    rows = sk.inspect_targets(lm, sk.STLConfig(tile=4, rank=24), targets=["lm_head", "c_fc"]).rows
    row = next(r for r in rows if r.name == "lm_head")
    assert row.status == "skipped" and "tied to the input embedding transformer.wte" in row.reason
    sk.strassenify_(lm, sk.STLConfig(tile=4, rank=24), targets=["lm_head", "c_fc"])
    assert type(lm.lm_head) is torch.nn.Linear


# ------------------------------------------------------------------ padding safety
def _sentences():
    g = torch.Generator().manual_seed(1)
    short = torch.randint(2, V, (1, 5), generator=g)
    long_ = torch.randint(2, V, (1, 11), generator=g)
    return short, long_


def _alone_vs_batched(model):
    short, long_ = _sentences()
    alone = _out(model, short, attention_mask=torch.ones_like(short))[0]
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0, :5], ids[1] = short[0], long_[0]
    mask = torch.zeros(2, 11, dtype=torch.long)
    mask[0, :5], mask[1] = 1, 1
    batched = _out(model, ids, attention_mask=mask)[0, :5]
    return ((alone - batched).norm() / alone.norm()).item()


def test_bert_sentence_alone_equals_batched_with_padding():
    model = _bert()
    assert _alone_vs_batched(model) <= 1e-5  # dense reference
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    tiles = {n: m.row_tile for n, m in model.named_modules() if isinstance(m, sk.STLinear)}
    assert tiles.pop("pooler.dense") == 1  # its inputs are the [CLS] rows of different samples (2-D)
    assert set(tiles.values()) == {4}
    assert _alone_vs_batched(model) <= 1e-5


def test_padding_leak_test_fails_without_the_mask(monkeypatch):
    model = _bert()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    monkeypatch.setattr(sk.nn.padding.RowMask, "apply", lambda self, x, who="": x)
    assert _alone_vs_batched(model) > 1e-3


def test_left_padding_and_mismatched_masks_raise():
    model = _bert()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    ids = torch.randint(2, V, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(input_ids=ids, attention_mask=mask)
    layer = sk.STLinear(16, 16)
    with sk.row_mask(torch.tensor([[1, 1, 0]])):
        with pytest.raises(ValueError, match="cannot be told apart"):
            layer(torch.randn(1, 5, 16))
        assert layer(torch.randn(1, 3, 16)).shape == (1, 3, 16)
    assert sk.nn.current_row_mask() is None


def _calib_batches():
    short, long_ = _sentences()
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0, :5], ids[1] = short[0], long_[0]
    mask = torch.zeros_like(ids)
    mask[0, :5], mask[1] = 1, 1
    padded = [{"input_ids": ids, "attention_mask": mask}]
    unpadded = [{"input_ids": short, "attention_mask": torch.ones_like(short)},
                {"input_ids": long_, "attention_mask": torch.ones_like(long_)}]
    return padded, unpadded


def test_calibrate_on_padded_batches_fits_like_unpadded_and_stays_padding_safe():
    padded, unpadded = _calib_batches()
    fits = []
    for batches in (padded, unpadded):
        model = _bert()
        sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny data: underdetermined on purpose
            rep = sk.calibrate_(model, batches, ridge=1e-3, progress=False)
        fits.append((model, rep))
    (m_pad, r_pad), (m_unp, r_unp) = fits
    assert [c.rows for c in r_pad.layers] == [c.rows for c in r_unp.layers]
    for (n, a), (_, b) in zip(m_pad.named_modules(), m_unp.named_modules()):
        if isinstance(a, sk.STLinear):
            assert torch.allclose(a.w_hat, b.w_hat, rtol=1e-4, atol=1e-5), n
    assert _alone_vs_batched(m_pad) <= 1e-5


def test_calibrate_reports_equations_and_warns_when_underdetermined():
    padded, _ = _calib_batches()
    model = _bert()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    with pytest.warns(UserWarning, match="underdetermined.*more batches.*ridge="):
        rep = sk.calibrate_(model, padded, progress=False, layers=["encoder.layer.0.attention.self.query"])
    c = rep.layers[0]
    assert c.rows == 16 and c.equations == 16 * 4 and c.unknowns == 24 * 16 and c.underdetermined
    assert "UNDERDETERMINED" in rep.table()


# ------------------------------------------------------------------ save / load
def _roundtrip(model, cls, tmp_path, inputs):
    ref = _out(model, **inputs)
    sk.save_pretrained(model, tmp_path)
    loaded = sk.from_pretrained(tmp_path, cls)
    assert torch.equal(_out(loaded, **inputs), ref)
    assert [n for n, m in loaded.named_modules() if isinstance(m, sk.STLinear)] == \
        [n for n, m in model.named_modules() if isinstance(m, sk.STLinear)]
    return loaded


def test_save_and_load_bert_bit_identical_and_plain_transformers_fails_loudly(tmp_path):
    model = _bert()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24, init="als"))
    padded, _ = _calib_batches()
    ids, mask = padded[0]["input_ids"], padded[0]["attention_mask"]
    loaded = _roundtrip(model, BertModel, tmp_path, {"ids": ids, "attention_mask": mask})
    assert _alone_vs_batched(loaded) <= 1e-5  # the padding hook comes back with the conversion
    cfg = (tmp_path / "config.json").read_text()
    assert "strassenkit.from_pretrained" in cfg
    with pytest.raises(OSError):
        BertModel.from_pretrained(tmp_path)


def test_save_and_load_llama_for_causal_lm(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_cfg()).eval()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=12))
    loaded = _roundtrip(model, LlamaForCausalLM, tmp_path, {"ids": torch.randint(2, V, (2, 7))})
    assert all(m.row_tile == 1 for m in loaded.modules() if isinstance(m, sk.STLinear))
    with pytest.raises(FileNotFoundError, match="strassenkit.json"):
        sk.from_pretrained(tmp_path / "nope", LlamaForCausalLM)


def test_save_and_load_a_plain_torch_model(tmp_path):
    def build():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    model = build()
    sk.strassenify_(model, {"0": sk.STLConfig(tile=4, rank=8, row_tile=1), "2": sk.SPNConfig(rank=6)})
    x = torch.randn(3, 16)
    ref = model(x)
    sk.save_pretrained(model, tmp_path)
    loaded = sk.from_pretrained(tmp_path, build)
    assert torch.equal(loaded(x), ref)


# ------------------------------------------------------------------ ecosystem conventions
def test_filter_fn_beside_targets():
    model = _bert()
    conv = sk.strassenify_(model, sk.STLConfig(tile=4, rank=24), filter_fn=lambda m, fqn: "intermediate" in fqn)
    assert conv == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]


def test_unload_restores_the_original_dense_layers_exactly():
    model = _bert()
    ids = torch.randint(2, V, (2, 9))
    ref = _out(model, ids)
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    padded, _ = _calib_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.calibrate_(model, padded, progress=False, layers=["encoder.layer.0.intermediate.dense"])
    restored = sk.unload_(model)
    assert len(restored) == 13 and not any(isinstance(m, sk.STLinear) for m in model.modules())
    assert torch.equal(_out(model, ids), ref)
    m2 = _bert()
    sk.strassenify_(m2, sk.STLConfig(tile=4, rank=24, keep_dense_weight=False))
    with pytest.raises(ValueError, match="do not hold their original dense layer"):
        sk.unload_(m2)


def test_peft_adapters_are_left_alone():
    peft = pytest.importorskip("peft")
    model = _bert()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    assert conv and not any("lora_" in n or ".query" in n or ".value" in n for n in conv)
    assert any(n.endswith("attention.self.key") for n in conv)


def test_conv1d_is_counted_as_a_linear_layer():
    g = GPT2Model(_gpt2_cfg())
    ids = torch.randint(2, V, (2, 16))
    rows = {c.name: c for c in sk.cost.count(g, input_ids=ids).layers}
    assert rows["h.0.attn.c_attn"].dense_macs == 2 * 16 * 64 * 192
    assert rows["h.0.mlp.c_proj"].macs == 2 * 16 * 256 * 64


def test_converting_twice_skips_converted_layers_quietly():
    model = _bert()
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = sk.inspect_targets(model, {"re:.*query": sk.STLConfig(rank=30)}).rows
    assert [str(w.message) for w in caught] == ["inspect_targets: targets='all-linear' matched no convertible module"]
    assert {r.status for r in rows if r.name.endswith("query")} == {"skipped"}
    assert all("already converted (STLinear)" in r.reason for r in rows if r.name.endswith("query"))


@pytest.mark.parametrize("name", ["BertModel", "GPT2Model"])
def test_training_step_on_hf_models_same_with_the_cpp_training_node(name, monkeypatch):
    """A user's model converted by strassenify_: its small STL layers train through the C++ autograd node; every
    parameter gradient equals the Python autograd function's bit for bit (BERT with 4-row tiles, GPT-2 causal)."""
    import strassenkit.functional.ops as ops
    from strassenkit.functional import native

    if not native.available():
        pytest.skip("native kernels not built")
    torch.manual_seed(0)
    if name == "BertModel":
        model = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=V, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0))
    else:
        model = GPT2Model(_gpt2_cfg(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    sk.strassenify_(model, sk.STLConfig(tile=4, rank=24))
    model.train()
    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(1))
    nodes = []
    for mod in model.modules():
        if isinstance(mod, sk.nn.STLinear):
            mod.register_forward_hook(lambda m, i, o: nodes.append(o.grad_fn.name()))

    def grads():
        model.zero_grad()
        model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = grads()
    fused = sum("FusedTrain" in n for n in nodes)
    assert fused >= 2 * (6 if name == "BertModel" else 4), nodes  # every block linear (BERT's 2-D pooler: not)
    nodes.clear()
    monkeypatch.setitem(ops._FUSED_TRAIN, "ok", False)
    ref = grads()
    assert nodes and not any("FusedTrain" in n for n in nodes)
    assert fast.keys() == ref.keys() and len(fast) > 10
    for n in ref:
        assert torch.equal(fast[n], ref[n]), n
