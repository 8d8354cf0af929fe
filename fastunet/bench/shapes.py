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


def unet_shapes(
    batch: int = 16,
    size: int | tuple[int, int] = 256,
    base_channels: int = 64,
    depth: int = 4,
    in_channels: int = 3,
    num_classes: int = 2,
) -> dict[str, list]:
    """Every conv, pool and upsample+concat of the network on a `size` (H, W or square) input."""
    height, width = (size, size) if isinstance(size, int) else size
    channels = [base_channels * 2**i for i in range(depth + 1)]
    sizes = [(height >> i, width >> i) for i in range(depth + 1)]  # floor pooling
    convs, pools, upsamples = [], [], []
    for i, (c, (h, w)) in enumerate(zip(channels, sizes, strict=True)):
        c_in = in_channels if i == 0 else channels[i - 1]
        if i > 0:
            pools.append(PoolShape(f"pool{i}", batch, c_in, *sizes[i - 1]))
        convs.append(ConvShape(f"enc{i}.conv1", batch, c_in, c, h, w, 3))
        convs.append(ConvShape(f"enc{i}.conv2", batch, c, c, h, w, 3))
    for i in reversed(range(depth)):
        c, (h, w) = channels[i], sizes[i]
        upsamples.append(UpsampleShape(f"up{i}", batch, channels[i + 1], *sizes[i + 1], c, h, w))
        convs.append(ConvShape(f"dec{i}.conv1", batch, c + channels[i + 1], c, h, w, 3))
        convs.append(ConvShape(f"dec{i}.conv2", batch, c, c, h, w, 3))
    convs.append(ConvShape("head", batch, channels[0], num_classes, height, width, 1, relu=False))
    return {"conv": convs, "pool": pools, "upsample": upsamples}
