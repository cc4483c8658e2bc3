"""Character-level LSTM language model whose three matmuls come from a factory (dense, StrassenNets, ...).

Layers: embedding (V -> E), ``gates_in`` = make_linear(E, 4H) applied to the whole sequence at once,
``gates_rec`` = make_linear(H, 4H) applied at every time step (the recurrent matmul), ``head`` =
make_linear(H, V). Shapes: ids (B, T) int64 -> logits (B, T, V); optional state (h, c) each (B, H).

The recurrent layer runs T times per forward; for SPNLinear layers its effective (ternary) matrices are
computed once per forward instead of once per step (same result, far less quantization work).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharLSTM"]


def _dense(i: int, o: int, bias: bool = True) -> nn.Module:
    return nn.Linear(i, o, bias=bias)


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 128,
                 make_linear: Callable[..., nn.Module] = _dense):
        super().__init__()
        for n, v in (("vocab_size", vocab_size), ("embed", embed), ("hidden", hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive integer, got {v!r}")
        self.vocab_size, self.hidden = vocab_size, hidden
        self.embed = nn.Embedding(vocab_size, embed)
        self.gates_in = make_linear(embed, 4 * hidden)
        self.gates_rec = make_linear(hidden, 4 * hidden)
        self.head = make_linear(hidden, vocab_size)

    def _recurrent_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        from strassenkit.nn import SPNLinear

        m = self.gates_rec
        if isinstance(m, nn.Linear):
            return lambda h: F.linear(h, m.weight, m.bias)
        if isinstance(m, SPNLinear) and m.norm is None:
            from strassenkit.functional import spn_linear

            w_b, w_c = m.effective("w_b"), m.effective("w_c")
            return lambda h: spn_linear(h, w_b, m.a_hat, w_c, m.bias)
        return m

    def forward(self, ids: torch.Tensor, state=None):
        """ids (B, T) -> (logits (B, T, V), (h, c))."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        B, T = ids.shape
        xg = self.gates_in(self.embed(ids))  # (B, T, 4H)
        if state is None:
            h = xg.new_zeros(B, self.hidden)
            c = xg.new_zeros(B, self.hidden)
        else:
            h, c = state
        rec = self._recurrent_fn()
        outs = []
        for t in range(T):
            g = xg[:, t] + rec(h)
            i, f, gg, o = g.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        hs = torch.stack(outs, dim=1)  # (B, T, H)
        return self.head(hs), (h, c)
