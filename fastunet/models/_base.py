"""What ReferenceUNet and UNet share: arguments, module tree (so state_dict keys), input checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

UPSAMPLE_MODES = ("nearest", "bilinear")


def _autocasts(x: Tensor, weight: Tensor) -> bool:
    """Whether autocast casts a convolution of x and weight to one dtype: enabled for x's
    device, and both of floating types it casts (not float64)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return False
    return all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in (x, weight))


class UNetBase(nn.Module):
    """The module tree of the reference architecture (see DESIGN.md).

    Subclasses give `double_conv(in, out)` and `head(in, out)` modules and the forward; the
    parameter names are `encoders.{i}.conv{1,2}`, `decoders.{i}.conv{1,2}` and `head`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        upsample: str = "nearest",
        align_corners: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        for arg, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_channels", base_channels),
            ("depth", depth),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"{name}: upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            base_channels=base_channels,
            depth=depth,
            upsample=upsample,
            align_corners=bool(align_corners),
        )
        self.depth, self.upsample, self.align_corners = depth, upsample, bool(align_corners)
        self.in_channels = in_channels
        channels = [base_channels * 2**i for i in range(depth + 1)]
        inputs = [in_channels, *channels[:-1]]
        self.encoders = nn.ModuleList(
            self.double_conv(i, c) for i, c in zip(inputs, channels, strict=True)
        )
        self.decoders = nn.ModuleList(
            self.double_conv(channels[i] + channels[i + 1], channels[i]) for i in range(depth)
        )
        self.head = self.head_conv(channels[0], num_classes)

    def double_conv(self, in_channels: int, out_channels: int) -> nn.Module:
        raise NotImplementedError

    def head_conv(self, in_channels: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        """A clear error for input the network cannot take, naming its shape, dtype or device."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: input must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name}: input has {x.shape[1]} channels (shape {tuple(x.shape)}) but the "
                f"model was built with in_channels={self.in_channels}"
            )
        smallest = 2**self.depth
        if x.shape[2] < smallest or x.shape[3] < smallest:
            raise ValueError(
                f"{name}: H and W must be >= 2**depth = {smallest} for depth={self.depth}, "
                f"got shape {tuple(x.shape)}"
            )
        weight = self.head.weight
        if x.device != weight.device:
            raise ValueError(
                f"{name}: input is on {x.device} but the model's parameters are on {weight.device}"
            )
        # PyTorch's own error blames "bias type"; autocast casts both, where it runs.
        if x.dtype != weight.dtype and not _autocasts(x, weight):
            raise TypeError(
                f"{name}: input is {x.dtype} but the model's parameters are {weight.dtype}: "
                "cast one to the other, or run under torch.autocast"
            )

    def convert_to(self, cls: type[UNetBase]) -> UNetBase:
        """The same network as another UNetBase subclass, with these weights, device and dtype."""
        weight = self.head.weight
        other = cls(**self.config).to(device=weight.device, dtype=weight.dtype)
        other.load_state_dict(self.state_dict())
        return other.train(self.training)
