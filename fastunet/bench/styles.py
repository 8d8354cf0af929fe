"""UNets written here in the style of popular libraries, for `fastunet.accelerate`'s tests and
bench: the layer patterns and forward code shapes those libraries use, none of their code.

- MilesialStyleUNet: Conv -> BatchNorm -> ReLU twice in a Sequential, MaxPool2d in a Sequential,
  bilinear `nn.Upsample` (or a transposed conv), a zero pad to the skip's size computed from
  the shapes, `cat([skip, up])`, a 1x1 head (as milesial's Pytorch-UNet).
- SmpStyleUNet: an encoder whose stem convolves with stride 2, decoder blocks that
  `interpolate(scale_factor=2)` and `cat([up, skip])` when a skip is given (the last one has
  none), Conv-BN-ReLU Sequentials, a 3x3 head (as segmentation_models_pytorch's Unet decoder).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class MilesialStyleUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        bilinear: bool = True,
    ):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        # Bilinear upsampling keeps channels, so each level below gives half of its width.
        factor = 2 if bilinear else 1
        self.stem = _double_conv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(
                nn.MaxPool2d(2),
                _double_conv(widths[i], widths[i + 1] // (factor if i == depth - 1 else 1)),
            )
            for i in range(depth)
        )
        self.ups = nn.ModuleList(
            _MilesialUp(widths[i + 1], widths[i] // (factor if i > 0 else 1), bilinear)
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.stem(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        x = features.pop()
        for up in self.ups:
            x = up(x, features.pop())
        return self.head(x)


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        *_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels)
    )


class _MilesialUp(nn.Module):
    """Upsample the lower level, pad it to the skip's size, concatenate [skip, up], convolve;
    in_channels is what the concatenation has."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = _double_conv(in_channels, out_channels)

    def forward(self, low: Tensor, skip: Tensor) -> Tensor:
        low = self.up(low)
        rows = skip.size(2) - low.size(2)
        cols = skip.size(3) - low.size(3)
        low = F.pad(low, [cols // 2, cols - cols // 2, rows // 2, rows - rows // 2])
        return self.conv(torch.cat([skip, low], dim=1))


class SmpStyleUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        encoder_channels: tuple[int, ...] = (32, 64, 128, 256, 512),
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError("SmpStyleUNet: one decoder block per encoder stage")
        first = encoder_channels[0]
        self.encoder = nn.ModuleList([
            nn.Sequential(  # the stem halves the size, so the last decoder block has no skip
                nn.Conv2d(in_channels, first, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(first),
                nn.ReLU(inplace=True),
            )
        ])  # fmt: skip
        for before, after in itertools.pairwise(encoder_channels):
            self.encoder.append(
                nn.Sequential(nn.MaxPool2d(2), *_conv_bn_relu(before, after),
                              *_conv_bn_relu(after, after))
            )  # fmt: skip
        skips = [*reversed(encoder_channels[:-1]), 0]
        ins = [encoder_channels[-1], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            _SmpDecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels, strict=True)
        )
        self.head = nn.Sequential(
            nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1), nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        skips = features[-2::-1]
        for i, block in enumerate(self.decoder):
            x = block(x, skips[i] if i < len(skips) else None)
        return self.head(x)


class _SmpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_channels + skip_channels, out_channels))
        self.conv2 = nn.Sequential(*_conv_bn_relu(out_channels, out_channels))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))
