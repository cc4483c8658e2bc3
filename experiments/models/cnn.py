"""A small ResNet-style CNN whose 3x3 convolutions come from a factory (dense, StrassenNets, ...).

Layout (input (B, 1, 28, 28) or (B, 28, 28) -> logits (B, classes)):
stem conv 3x3 stride 2 (C_in -> c, always dense: one input channel) -> BN -> ReLU (14x14)
-> ``blocks`` residual blocks (each two factory convs c -> c, BN, identity shortcut)
-> factory conv c -> 2c stride 2 -> BN -> ReLU (7x7)
-> ``blocks`` residual blocks (2c -> 2c)
-> global average pool -> head (factory linear 2c -> classes).
With ``blocks=1`` (the default) the module names are ``block1``/``block2`` as before; with more, ``block1``
and ``block2`` are nn.Sequential stacks of blocks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetSmall", "dense_conv", "dense_linear"]

ConvFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> 3x3 conv, padding 1


def dense_conv(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features)


class _Block(nn.Module):
    def __init__(self, c: int, make_conv: ConvFactory):
        super().__init__()
        self.conv1, self.bn1 = make_conv(c, c, 1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = make_conv(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetSmall(nn.Module):
    def __init__(self, width: int = 8, in_chans: int = 1, num_classes: int = 10,
                 make_conv: ConvFactory = dense_conv, make_linear=dense_linear, blocks: int = 1):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be an integer >= 1, got {blocks!r}")
        c = width
        self.in_chans = in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

        def stage(ch):
            return _Block(ch, make_conv) if blocks == 1 else nn.Sequential(*(_Block(ch, make_conv) for _ in range(blocks)))

        self.block1 = stage(c)
        self.down = make_conv(c, 2 * c, 2)
        self.down_bn = nn.BatchNorm2d(2 * c)
        self.block2 = stage(2 * c)
        self.head = make_linear(2 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W) or (B, H, W), got {tuple(x.shape)}")
        x = self.block1(self.stem(x))
        x = self.block2(F.relu(self.down_bn(self.down(x))))
        return self.head(x.mean(dim=(2, 3)))
