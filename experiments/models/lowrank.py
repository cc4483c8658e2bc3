"""Low-rank factorized linear layer: the classic FLOP-reduction baseline for structured matmuls.

y = B (A x) + bias with A: (rank, in_features), B: (out_features, rank). Input (..., K) -> output (..., N).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LowRankLinear", "matched_rank"]


class LowRankLinear(nn.Sequential):
    """Two nn.Linear layers, K -> rank (no bias) -> N (with bias); counted by cost.count as two linears."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        # keep the product's scale like a dense nn.Linear of the same fan-in
        nn.init.normal_(self[0].weight, std=1 / math.sqrt(in_features))
        nn.init.kaiming_uniform_(self[1].weight, a=math.sqrt(5))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """Truncated SVD of ``linear.weight`` (W ~ U_r S_r V_r^T; A = S^1/2 V^T, B = U S^1/2), bias kept.

        The best rank-``rank`` approximation of W in Frobenius norm (Eckart-Young); exact when
        ``rank >= min(K, N)``.
        """
        w = linear.weight.detach()
        N, K = w.shape
        if rank > min(K, N):
            raise ValueError(f"rank {rank} exceeds min(in_features, out_features) = {min(K, N)}")
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        layer = cls(K, N, rank, bias=linear.bias is not None)
        layer.to(device=w.device, dtype=w.dtype)
        layer[0].weight.copy_((root[:, None] * vh[:rank]).to(w.dtype))
        layer[1].weight.copy_((u[:, :rank] * root[None]).to(w.dtype))
        if linear.bias is not None:
            layer[1].bias.copy_(linear.bias)
        return layer


def matched_rank(in_features: int, out_features: int, macs_per_row: float) -> int:
    """Rank whose per-row cost rank*(K+N) is closest to ``macs_per_row`` (at least 1)."""
    if macs_per_row <= 0:
        raise ValueError(f"macs_per_row must be positive, got {macs_per_row}")
    return max(1, round(macs_per_row / (in_features + out_features)))
