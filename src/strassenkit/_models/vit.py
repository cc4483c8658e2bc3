"""A small vision transformer whose linear layers come from a factory (dense, STL, ...).

Shapes: images (B, H, W) or (B, C, H, W) -> patches (B, L, C*P*P) -> tokens (B, L, d) -> logits (B, classes).
The classifier is applied to every token and the logits are averaged over tokens; for a dense head this
equals mean-pooling then classifying, and it keeps every linear layer on a (B, L, features) input, so STL
layers can tile along the sequence axis inside each sample (no cross-sample mixing).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearFactory = Callable[[int, int], nn.Module]


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, make_linear: LinearFactory):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = make_linear(dim, 3 * dim)
        self.proj = make_linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d)
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, make_linear: LinearFactory):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, make_linear)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = make_linear(dim, hidden)
        self.fc2 = make_linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Pre-norm ViT: patch embedding, learned positions, ``depth`` blocks, token-wise head averaged over tokens."""

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        make_linear: LinearFactory = dense_linear,
        make_head: LinearFactory | None = None,
        make_embed: LinearFactory | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = (make_embed or make_linear)(in_chans * patch_size * patch_size, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, make_linear) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = (make_head or make_linear)(dim, num_classes)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, C, H, W) -> (B, L, C*P*P)."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W) or (B, H, W), got {tuple(images.shape)}")
        B, C, H, W = images.shape
        P = self.patch_size
        x = images.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // P) * (W // P), C * P * P)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(images)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, L, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).mean(dim=1)  # (B, classes)
