"""The offline synthetic tasks of ``strassenkit train`` (also used by the training-loop tests).

- ``synthetic``: sequence classification, x (n, 8, 16) Gaussian, 4 classes given by a fixed random
  function of the token mean and the first token; model :class:`TokenMLP`.
- ``synthetic-lm``: next-token prediction on a random 16-symbol Markov chain; model :class:`BigramLM`
  (causal: ``is_causal = True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenMLP", "BigramLM", "synthetic_data", "synthetic_lm_data"]


class TokenMLP(nn.Module):
    """(B, L, d_in) -> (B, classes): token-wise MLP, mean over tokens, linear head."""

    def __init__(self, d_in=16, hidden=32, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.gelu(self.fc2(F.gelu(self.fc1(x))))
        return self.head(h.mean(dim=1))


class BigramLM(nn.Module):
    """(B, L) tokens -> (B, L, vocab) logits; each position sees only its own token (causal)."""

    is_causal = True

    def __init__(self, vocab=16, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.lm_head(F.gelu(self.fc(self.emb(tokens))))


def synthetic_data(n_train=2048, n_eval=512, seed=1234):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_eval, 8, 16, generator=g)
    w1 = torch.randn(16, 4, generator=g)
    y = (x.mean(1) @ w1 + 0.3 * torch.tanh(x[:, 0] @ w1)).argmax(-1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def synthetic_lm_data(n_train=2048, n_eval=256, vocab=16, length=17, seed=1234):
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(vocab, vocab, generator=g) * 2.5, dim=-1)
    seq = torch.empty(n_train + n_eval, length, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (len(seq),), generator=g)
    for i in range(1, length):
        seq[:, i] = torch.multinomial(trans[seq[:, i - 1]], 1, generator=g)[:, 0]
    x, y = seq[:, :-1], seq[:, 1:]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
