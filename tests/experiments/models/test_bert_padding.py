"""experiments/models/bert.py is kept only as an independent cross-check of transformers' BertModel (the
MiniLM experiment uses the latter); its own padding tests stay, plus the HF equivalents."""

import pytest
import torch
from torch import nn

from strassenkit.nn.stlinear import STLinear

from experiments.models.bert import BertConfig, BertEncoder, convert_hf_bert_state

SMALL = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=32)


def _stl_bert(seed=0):
    torch.manual_seed(seed)
    return BertEncoder(SMALL, make_linear=lambda i, o: STLinear(i, o, tile=4, rank=7, init="random", seed=seed)).eval()


def test_shapes_and_unit_norm_embeddings():
    m = BertEncoder(SMALL).eval()
    ids = torch.randint(1, 50, (3, 9))
    assert m(ids).shape == (3, 9, 16)
    e = m.embed(ids)
    assert e.shape == (3, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="input_ids"):
        m(ids[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.ones(1, 40, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_does_not_change_real_tokens_with_stl_tiles(seed):
    """Approximate STL tiles mix 4 consecutive tokens: pad rows must be exactly zero at every layer input."""
    m = _stl_bert(seed)
    torch.manual_seed(10 + seed)
    short = torch.randint(1, 50, (1, 6))  # 6 tokens: the second row tile is half real, half pad
    long = torch.randint(1, 50, (1, 13))
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0, :6], batch[1] = short[0], long[0]
    mask = torch.zeros(2, 13, dtype=torch.long)
    mask[0, :6], mask[1] = 1, 1
    with torch.no_grad():
        alone = m(short)[0]
        padded = m(batch, mask)
        e_alone, e_padded = m.embed(short), m.embed(batch, mask)
    torch.testing.assert_close(padded[0, :6], alone, atol=1e-5, rtol=1e-5)
    assert padded[0, 6:].abs().max() == 0
    torch.testing.assert_close(e_padded[0], e_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], m(long)[0], atol=1e-5, rtol=1e-5)


def test_pad_rows_would_leak_without_zeroing():
    """Control: the STL layer itself does mix rows of a tile, so the masking above is what the test checks."""
    torch.manual_seed(0)
    layer = STLinear(8, 8, tile=4, rank=7, init="random")
    x = torch.randn(1, 4, 8)
    y0 = layer(x)
    x2 = x.clone()
    x2[0, 3] = 5.0  # change one row of the tile
    assert (layer(x2)[0, :3] - y0[0, :3]).abs().max() > 1e-3


def test_convert_hf_state_names_roundtrip():
    m = BertEncoder(SMALL)
    ours = m.state_dict()
    inv = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
           "attn_out": "attention.output.dense", "ln1": "attention.output.LayerNorm", "ffn_in": "intermediate.dense",
           "ffn_out": "output.dense", "ln2": "output.LayerNorm"}
    hf = {"embeddings.position_ids": torch.arange(32)[None], "pooler.dense.weight": torch.zeros(16, 16)}
    for k, v in ours.items():
        if k.startswith("layers."):
            _, i, mod, rest = k.split(".", 3)
            hf[f"encoder.layer.{i}.{inv[mod]}.{rest}"] = v
        else:
            name, rest = k.split(".", 1)
            hf_name = {"word": "word_embeddings", "position": "position_embeddings",
                       "token_type": "token_type_embeddings", "ln": "LayerNorm"}[name]
            hf[f"embeddings.{hf_name}.{rest}"] = v
    back = convert_hf_bert_state(hf)
    assert set(back) == set(ours)
    with pytest.raises(KeyError, match="unexpected"):
        convert_hf_bert_state({"encoder.layer.0.weird.weight": torch.zeros(1)})


def _minilm_available():
    try:
        from experiments.data.minilm import find_minilm

        find_minilm()
        import tokenizers  # noqa: F401
        return True
    except (FileNotFoundError, ImportError):
        return False


@pytest.mark.skipif(not _minilm_available(), reason="all-MiniLM-L6-v2 not installed (make data)")
def test_real_minilm_known_cosine():
    from experiments.data.minilm import Tokenizer
    from experiments.models.bert import load_minilm

    m, tok = load_minilm(), Tokenizer()
    ids, mask = tok(["A man is playing a guitar.", "Someone is playing an instrument."])
    with torch.no_grad():
        e = m.embed(ids, mask)
    assert abs(float(e[0] @ e[1]) - 0.6752) < 5e-4
    assert isinstance(m.layers[0].query, nn.Linear)


@pytest.mark.skipif(not _minilm_available(), reason="all-MiniLM-L6-v2 not installed (make data)")
def test_hf_bertmodel_gives_the_reference_encoders_embeddings():
    """Cross-check: the experiment uses transformers' BertModel; experiments/models/bert.py is an independent
    implementation of the same network (kept only for this check). Same weights, same embeddings."""
    pytest.importorskip("transformers")
    from experiments.data.minilm import Tokenizer
    from experiments.minilm import embed_all, load_teacher, load_tokenizer
    from experiments.models.bert import load_minilm

    sents = ["A man is playing a guitar.", "Someone is playing an instrument.", "To be, or not to be.",
             "Good night, sweet prince, and flights of angels sing thee to thy rest."]
    hf, tok = load_teacher(), load_tokenizer()
    ref, rtok = load_minilm(), Tokenizer()
    e_hf = embed_all(hf, tok, sents, 48)  # one padded batch
    with torch.no_grad():
        e_ref = torch.cat([ref.embed(*rtok([s], 48)) for s in sents])
    torch.testing.assert_close(e_hf, e_ref, atol=2e-5, rtol=1e-4)
    assert abs(float(e_hf[0] @ e_hf[1]) - 0.6752) < 5e-4


def test_hf_bert_with_stl_tiles_padding_does_not_change_real_tokens():
    """The converted HF model (padding hook of strassenify_): a sentence alone == the same sentence padded."""
    transformers = pytest.importorskip("transformers")
    import strassenkit as sk

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    sk.strassenify_(m, sk.STLConfig(tile=4, rank=7, init="random"))
    short = torch.randint(1, 50, (1, 6))
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0, :6], batch[1] = short[0], torch.randint(1, 50, (13,))
    mask = torch.zeros(2, 13, dtype=torch.long)
    mask[0, :6], mask[1] = 1, 1
    with torch.no_grad():
        alone = m(input_ids=short).last_hidden_state[0]
        padded = m(input_ids=batch, attention_mask=mask).last_hidden_state[0, :6]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
