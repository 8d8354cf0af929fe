"""Small nn.Modules over the ops, with the parameter names of their torch.nn counterparts.

Each call runs the fastunet op or PyTorch's own path, whichever this layer's measured choice
says (`fastunet.ops._choice`): a module is never slower than the torch.nn layers it replaces.
"""

from __future__ import annotations

import operator

from torch import Tensor, nn

from fastunet import ops
from fastunet.ops._choice import run_layer
from fastunet.ops.upsample_concat import check_mode


class NotScriptable:
    """Makes torch.jit.script refuse a module holding this layer with an error that says what to
    do instead, rather than with TorchScript's about the layer's Python (script calls
    `__prepare_scriptable__` on the module and each submodule before it compiles anything)."""

    def __prepare_scriptable__(self):
        raise TypeError(
            f"torch.jit.script: {type(self).__name__} is one of fastunet's layers, which "
            "TorchScript cannot compile (they choose their path in Python). torch.export "
            "captures fastunet's ops (loading the result needs fastunet imported); "
            "torch.jit.trace the path each layer took (fastunet's ops on a GPU, PyTorch's own "
            "calls on the CPU). "
            "For TorchScript without fastunet, torch.jit.trace the plain PyTorch model: "
            "UNet.to_reference() (which does not script either), or the model given to "
            "fastunet.accelerate (unless accelerated with inplace=True)"
        )


class Conv2dReLU(NotScriptable, nn.Conv2d):
    """`nn.Conv2d` (stride 1) followed by ReLU, as one fused op.

    nn.Conv2d's parameters (stride 1, so no `stride`), initialisation and state_dict keys;
    `relu=False` gives the plain convolution (the UNet's 1x1 head). After kernel_size they are
    keyword-only: nn.Conv2d's fourth is `stride`, and `Conv2dReLU(c, c, 3, 1)` must not pad
    where nn.Conv2d would not.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        bias: bool = True,
        relu: bool = True,
        device=None,
        dtype=None,
    ):
        # A numpy integer too, as nn.Conv2d takes it, made a plain int: the op calls get no
        # dispatcher to convert it. Not a bool, which nn.Conv2d's forward refuses.
        if isinstance(padding, bool) or not hasattr(type(padding), "__index__"):
            raise TypeError(f"Conv2dReLU: padding must be an int, got {padding!r}")
        padding = operator.index(padding)
        super().__init__(
            in_channels, out_channels, kernel_size, padding=padding, bias=bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        return run_layer(
            "conv2d_relu", ops.conv2d_relu, x, self.weight, self.bias, self.padding[0], self.relu
        )

    def forward_upsampled(
        self, x: Tensor, skip: Tensor, mode: str = "nearest", align_corners: bool = False
    ) -> Tensor:
        """This layer on cat([skip, upsample(x, skip's size)], 1), without the concat tensor."""
        return run_layer(
            "upsample_concat_conv2d_relu", ops.upsample_concat_conv2d_relu, x, skip,
            self.weight, self.bias, self.padding[0], self.relu, mode, align_corners,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"


class UpsampleConcat(NotScriptable, nn.Module):
    """`torch.cat([skip, F.interpolate(x, size=skip.shape[-2:], mode=mode)], 1)` as one op."""

    def __init__(self, mode: str = "nearest", align_corners: bool = False):
        super().__init__()
        # Here, not at the first call: PyTorch's path (the CPU's) would take other modes.
        check_mode("UpsampleConcat", mode, align_corners)
        self.mode, self.align_corners = mode, bool(align_corners)  # as UNet takes it

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return run_layer(
            "upsample_concat", ops.upsample_concat, x, skip, self.mode, self.align_corners
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, align_corners={self.align_corners}"


class MaxPool2d(NotScriptable, nn.Module):
    """`nn.MaxPool2d(2)`, saving one byte per output element for the backward."""

    def forward(self, x: Tensor) -> Tensor:
        return run_layer("max_pool2d", ops.max_pool2d, x)
