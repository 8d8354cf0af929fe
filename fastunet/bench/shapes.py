"""The shapes each op sees inside ReferenceUNet / UNet, level by level."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvShape:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    relu: bool = True

    @property
    def padding(self) -> int:
        return self.kernel // 2

    def flops(self) -> int:
        """Forward multiply-adds x 2 (bias and ReLU not counted)."""
        pixels = self.batch * self.height * self.width
        return 2 * pixels * self.out_channels * self.in_channels * self.kernel**2


@dataclass(frozen=True)
class PoolShape:
    name: str
    batch: int
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class UpsampleShape:
    name: str
    batch: int
    x_channels: int
    x_height: int
    x_width: int
    skip_channels: int
    height: int
    width: int


def level_sizes(size: int, depth: int) -> list[int]:
    sizes = [size]
    for _ in range(depth):
        sizes.append(sizes[-1] // 2)
    return sizes


def unet_shapes(
    batch: int = 16,
    size: int = 256,
    base_channels: int = 64,
    depth: int = 4,
    in_channels: int = 3,
    num_classes: int = 2,
) -> dict[str, list]:
    """Every conv, pool and upsample+concat of the network on a square `size` input."""
    channels = [base_channels * 2**i for i in range(depth + 1)]
    sizes = level_sizes(size, depth)
    convs, pools, upsamples = [], [], []
    for i, (c, s) in enumerate(zip(channels, sizes, strict=True)):
        c_in = in_channels if i == 0 else channels[i - 1]
        if i > 0:
            pools.append(PoolShape(f"pool{i}", batch, c_in, sizes[i - 1], sizes[i - 1]))
        convs.append(ConvShape(f"enc{i}.conv1", batch, c_in, c, s, s, 3))
        convs.append(ConvShape(f"enc{i}.conv2", batch, c, c, s, s, 3))
    for i in reversed(range(depth)):
        c, s = channels[i], sizes[i]
        up = UpsampleShape(f"up{i}", batch, channels[i + 1], sizes[i + 1], sizes[i + 1], c, s, s)
        upsamples.append(up)
        convs.append(ConvShape(f"dec{i}.conv1", batch, c + channels[i + 1], c, s, s, 3))
        convs.append(ConvShape(f"dec{i}.conv2", batch, c, c, s, s, 3))
    convs.append(ConvShape("head", batch, channels[0], num_classes, size, size, 1, relu=False))
    return {"conv": convs, "pool": pools, "upsample": upsamples}
