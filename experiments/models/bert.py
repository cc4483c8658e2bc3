"""A small BERT encoder (post-LayerNorm, as in the original BERT) with a linear-layer factory.

Kept only as an independent cross-check: the MiniLM experiment uses transformers' ``BertModel``, and
``tests/experiments/models/test_bert_padding.py`` checks that both give the same embeddings.

It loads the weights of all-MiniLM-L6-v2 (:func:`load_minilm`) and produces its sentence embeddings:
mean pooling over real tokens followed by L2 normalization.

Shapes: input_ids (B, L) int64, attention_mask (B, L) {0,1} (right padding) -> token states (B, L, d),
sentence embeddings (B, d).

Padding: every linear layer sees its input multiplied by the mask, so padding rows are exactly zero at
every layer input. Layers that mix rows inside a tile (STL with row_tile > 1) then see the same tiles as
for the unpadded sentence (whose length is padded with zero rows internally), so padding never changes
the embeddings of real tokens. Attention ignores padded keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertConfig", "BertEncoder", "load_minilm", "dense_linear"]

LinearFactory = Callable[[int, int], nn.Module]


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, config has {d.get('hidden_act')!r}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, make_linear: LinearFactory):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        if d % h:
            raise ValueError(f"hidden_size={d} must be divisible by num_attention_heads={h}")
        self.heads = h
        self.query, self.key, self.value = make_linear(d, d), make_linear(d, d), make_linear(d, d)
        self.attn_out = make_linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn_in = make_linear(d, cfg.intermediate_size)
        self.ffn_out = make_linear(cfg.intermediate_size, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), mask (B, L) float {0,1}."""
        B, L, d = x.shape
        m = mask.unsqueeze(-1)
        xm = x * m
        split = lambda t: t.view(B, L, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(xm)), split(self.key(xm)), split(self.value(xm))
        keep = mask.bool()[:, None, None, :]  # (B, 1, 1, L): attend to real keys only
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        a = a.transpose(1, 2).reshape(B, L, d)
        x = self.ln1(x + self.attn_out(a * m))
        hmid = F.gelu(self.ffn_in(x * m))
        return self.ln2(x + self.ffn_out(hmid * m))


class BertEncoder(nn.Module):
    """BERT encoder; ``make_linear(in, out)`` builds every linear layer of the transformer blocks."""

    def __init__(self, cfg: BertConfig, make_linear: LinearFactory = dense_linear):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, d)
        self.position = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type = nn.Embedding(cfg.type_vocab_size, d)
        self.ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg, make_linear) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> token states (B, L, d). Padding must be on the right."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.cfg.max_position_embeddings:
            raise ValueError(f"seq_len {L} exceeds max_position_embeddings={self.cfg.max_position_embeddings}; truncate")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        mask = attention_mask.to(self.word.weight.dtype)
        pos = torch.arange(L, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(input_ids))
        x = self.ln(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x * mask.unsqueeze(-1)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings (B, d): mean over real tokens, then L2-normalized."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self(input_ids, attention_mask)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)

    def linear_names(self) -> list[str]:
        """Names of the linear layers built by the factory (the ones an experiment may replace)."""
        return [f"layers.{i}.{n}" for i in range(len(self.layers))
                for n in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")]


_KEYMAP = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "ln1",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ln2",
}


def convert_hf_bert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BertModel state dict to this module's names (pooler and position_ids dropped)."""
    out = {}
    for k, v in state.items():
        if k.startswith("pooler.") or k.endswith("position_ids"):
            continue
        k = k.removeprefix("bert.")
        if k.startswith("embeddings."):
            rest = k[len("embeddings."):]
            rest = (rest.replace("word_embeddings", "word").replace("position_embeddings", "position")
                    .replace("token_type_embeddings", "token_type").replace("LayerNorm", "ln"))
            out[rest] = v
            continue
        if not k.startswith("encoder.layer."):
            raise KeyError(f"unexpected key in BERT state dict: {k}")
        i, rest = k[len("encoder.layer."):].split(".", 1)
        for src, dst in _KEYMAP.items():
            if rest.startswith(src + "."):
                out[f"layers.{i}.{dst}.{rest[len(src) + 1:]}"] = v
                break
        else:
            raise KeyError(f"unexpected key in BERT state dict: {k}")
    return out


def load_minilm(root=None, make_linear: LinearFactory = dense_linear) -> BertEncoder:
    """all-MiniLM-L6-v2 as a dense :class:`BertEncoder` in eval mode (float32).

    ``make_linear`` must build nn.Linear-compatible modules (weights are loaded by name); convert layers to
    other types afterwards (e.g. with STLinear.from_linear).
    """
    from ..data.minilm import load_minilm_config, load_minilm_state  # noqa: PLC0415

    cfg = BertConfig.from_dict(load_minilm_config(root))
    model = BertEncoder(cfg, make_linear)
    missing, unexpected = model.load_state_dict(convert_hf_bert_state(load_minilm_state(root)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"all-MiniLM-L6-v2 weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()
