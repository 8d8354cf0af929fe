"""ReferenceUNet: the architecture in plain PyTorch, the oracle that fastunet.UNet must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunet.models._base import UNetBase


class DoubleConv(nn.Module):
    """Conv2d 3x3 (padding 1, bias) -> ReLU -> Conv2d 3x3 (padding 1, bias) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class ReferenceUNet(UNetBase):
    """UNet in plain PyTorch.

    Args:
        in_channels: channels of the input image.
        num_classes: channels of the output logits.
        base_channels: channels at level 0; level i has base_channels * 2**i.
        depth: number of max-pool steps; H and W must be >= 2**depth.
        upsample: "nearest" or "bilinear", the decoder's upsampling to the skip's size.
        align_corners: passed to bilinear interpolation.
    """

    def double_conv(self, in_channels: int, out_channels: int) -> nn.Module:
        return DoubleConv(in_channels, out_channels)

    def head_conv(self, in_channels: int, num_classes: int) -> nn.Module:
        return nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.depth)):
            skip = skips[level]
            align = self.align_corners if self.upsample == "bilinear" else None
            up = F.interpolate(x, size=skip.shape[-2:], mode=self.upsample, align_corners=align)
            x = self.decoders[level](torch.cat([skip, up], 1))
        return self.head(x)
