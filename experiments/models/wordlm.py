"""Character-aware word-level language model (Kim, Jernite, Sontag, Rush 2016), layers from factories.

Input: type ids (B, T) of the words and the spelling table ``chars`` (n_types, L) of character ids (0 = padding);
output: logits (B, T, V) over the word vocabulary. Layers, in order:

- ``char_embed``: nn.Embedding(n_chars, char_dim) (padding id 0 embeds to zeros);
- ``convs``: one convolution per filter width w in ``widths`` with ``filters_per_width * w`` filters
  (Kim's small model: widths 1..6, 25 w filters), built as ``make_conv(char_dim, filters, w)`` =
  a Conv2d with kernel (1, w) over the (B*T, char_dim, 1, L) spelled words; tanh, max over time, concatenated;
- ``highways``: ``make_linear(d, d)`` transform (ReLU) and gate (sigmoid, bias -2) per highway layer,
  z = t * relu(W_H y) + (1 - t) * y;
- ``lstm``: ``layers`` LSTM layers, each ``gates_in`` = make_linear(in, 4H) applied to the whole sequence and
  ``gates_rec`` = make_linear(H, 4H) at every step (for SPNLinear layers the effective ternary matrices are
  computed once per forward, as in the char-LSTM); dropout between layers and before the softmax;
- ``head``: make_linear(H, V), the word softmax.

``make_head`` and ``make_highway`` (default: ``make_linear``) give the softmax and the highway layers their own
factories.

``count_mode = True`` runs the recurrent layers as modules at every step (slower) so that forward hooks,
e.g. strassenkit.cost's counters, see every recurrent multiplication, and computes the word vector of every
token. Otherwise ``words`` computes each distinct word type of the batch once and gathers the copies: the
convolutions and highways see about half the rows on Shakespeare batches (20 x 35 tokens), with the same
values and gradients (the vector of a type depends only on its spelling; tests/experiments/test_wordlm.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharAwareLM", "dense_linear", "dense_conv"]


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features)


def dense_conv(in_channels: int, out_channels: int, width: int) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, (1, width))


class _Highway(nn.Module):
    def __init__(self, d: int, make_linear: Callable[[int, int], nn.Module]):
        super().__init__()
        self.transform = make_linear(d, d)
        self.gate = make_linear(d, d)
        if getattr(self.gate, "bias", None) is not None:
            with torch.no_grad():
                self.gate.bias.fill_(-2.0)  # carry the input at the start (Kim et al.)

    def forward(self, y):
        t = torch.sigmoid(self.gate(y))
        return t * F.relu(self.transform(y)) + (1 - t) * y


class _LSTMLayer(nn.Module):
    def __init__(self, d_in: int, hidden: int, make_linear: Callable[[int, int], nn.Module]):
        super().__init__()
        self.hidden = hidden
        self.gates_in = make_linear(d_in, 4 * hidden)
        self.gates_rec = make_linear(hidden, 4 * hidden)

    def _recurrent_fn(self, count_mode: bool):
        from strassenkit.functional import spn_linear
        from strassenkit.nn import SPNLinear

        m = self.gates_rec
        if count_mode:
            return m
        if isinstance(m, nn.Linear):
            return lambda h: F.linear(h, m.weight, m.bias)
        if isinstance(m, SPNLinear) and m.norm is None:
            w_b, w_c = m.effective("w_b"), m.effective("w_c")
            return lambda h: spn_linear(h, w_b, m.a_hat, w_c, m.bias)
        return m

    def forward(self, x, state, count_mode: bool = False):  # x (B, T, d_in)
        B, T, _ = x.shape
        xg = self.gates_in(x)
        if state is None:
            h = xg.new_zeros(B, self.hidden)
            c = xg.new_zeros(B, self.hidden)
        else:
            h, c = state
        rec = self._recurrent_fn(count_mode)
        outs = []
        for t in range(T):
            i, f, g, o = (xg[:, t] + rec(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class CharAwareLM(nn.Module):
    def __init__(self, chars: torch.Tensor, n_chars: int, vocab_size: int, *, char_dim: int = 15,
                 widths=(1, 2, 3, 4, 5, 6), filters_per_width: int = 25, highway_layers: int = 1, hidden: int = 300,
                 layers: int = 2, dropout: float = 0.5,
                 make_linear: Callable[[int, int], nn.Module] = dense_linear,
                 make_conv: Callable[[int, int, int], nn.Module] = dense_conv,
                 make_head: Callable[[int, int], nn.Module] | None = None,
                 make_highway: Callable[[int, int], nn.Module] | None = None):
        super().__init__()
        if chars.dim() != 2:
            raise ValueError(f"chars must be (n_types, max_len), got shape {tuple(chars.shape)}")
        if max(widths) > chars.shape[1]:
            raise ValueError(f"filter width {max(widths)} exceeds the spelled word length {chars.shape[1]}")
        for n, v in (("n_chars", n_chars), ("vocab_size", vocab_size), ("hidden", hidden), ("layers", layers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        self.register_buffer("chars", chars.clone(), persistent=False)
        self.hidden, self.count_mode = hidden, False
        self.char_embed = nn.Embedding(n_chars, char_dim, padding_idx=0)
        self.convs = nn.ModuleList(make_conv(char_dim, filters_per_width * w, w) for w in widths)
        d = filters_per_width * sum(widths)
        self.word_dim = d
        self.highways = nn.ModuleList(_Highway(d, make_highway or make_linear) for _ in range(highway_layers))
        self.lstm = nn.ModuleList(_LSTMLayer(d if i == 0 else hidden, hidden, make_linear) for i in range(layers))
        self.drop = nn.Dropout(dropout)
        self.head = (make_head or make_linear)(hidden, vocab_size)

    def words(self, types: torch.Tensor) -> torch.Tensor:
        """type ids (B, T) -> word vectors (B, T, d) from their spellings (CNN, max over time, highways)."""
        B, T = types.shape
        batch_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                          for part in (self.convs, self.highways) for m in part.modules())
        if self.count_mode or batch_stats:  # every token's vector (cost counters count per token; batch statistics)
            uniq, inv = types.reshape(-1), None
        else:  # each distinct type once
            uniq, inv = torch.unique(types.reshape(-1), return_inverse=True)
        e = self.char_embed(self.chars[uniq])  # (n, L, char_dim)
        e = e.transpose(1, 2).unsqueeze(2)  # (n, char_dim, 1, L)
        y = torch.cat([torch.tanh(conv(e)).amax(dim=(2, 3)) for conv in self.convs], dim=-1)  # (n, d)
        for hw in self.highways:
            y = hw(y)
        return (y if inv is None else y[inv]).reshape(B, T, -1)

    def forward(self, types: torch.Tensor, state=None):
        """types (B, T) -> (logits (B, T, V), state: a list of (h, c) per LSTM layer)."""
        if types.dim() != 2:
            raise ValueError(f"types must be (batch, time), got shape {tuple(types.shape)}")
        x = self.words(types)
        new_state = []
        for i, layer in enumerate(self.lstm):
            x, s = layer(self.drop(x) if i else x, None if state is None else state[i], self.count_mode)
            new_state.append(s)
        return self.head(self.drop(x)), new_state
