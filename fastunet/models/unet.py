"""UNet: the drop-in for ReferenceUNet, built only from fastunet's ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastunet import ops
from fastunet.models._base import UNetBase
from fastunet.models.reference import ReferenceUNet
from fastunet.nn import Conv2dReLU, MaxPool2d, NotScriptable
from fastunet.ops._choice import (
    choose_layout,
    pytorch_by_rule,
    run_layer,
    runs_pytorch_by_rule,
    symbolic,
)
from fastunet.ops._common import (
    GLOBAL_HOOKS,
    has_hooks,
    in_functorch_transform,
    in_memory_format,
    memory_format_of,
)


class FusedDoubleConv(nn.Module):
    """Two fused conv 3x3 + bias + ReLU, with the parameter names of the reference DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = Conv2dReLU(in_channels, out_channels, 3, padding=1)
        self.conv2 = Conv2dReLU(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class UNet(NotScriptable, UNetBase):
    """fastunet's UNet: same arguments, parameter names and results as ReferenceUNet.

    Activations are channels_last inside on a GPU; on the CPU, in whichever of NCHW and
    channels_last measured faster for the shape and pass (see `_faster_cpu_layout`). The output has
    the memory format of the input. Each layer runs the fastunet op or PyTorch's own path,
    whichever measures faster.
    `fast.load_state_dict(ref.state_dict())` is strict and exact, both ways.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = MaxPool2d()

    def double_conv(self, in_channels: int, out_channels: int) -> nn.Module:
        return FusedDoubleConv(in_channels, out_channels)

    def head_conv(self, in_channels: int, num_classes: int) -> nn.Module:
        return Conv2dReLU(in_channels, num_classes, 1, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if in_functorch_transform():
            return self._run(x)  # vmap, grad: a layout cannot be asked for or chosen there
        layout = memory_format_of(x)
        if x.is_cuda:  # the kernels' layout, and cuDNN's fastest for half types
            out = self._run(in_memory_format(x, torch.channels_last))
        elif (
            not (torch.compiler.is_compiling() or symbolic(x))
            and x.numel()
            and runs_pytorch_by_rule(x)
        ):
            with pytorch_by_rule():  # the layers need not ask, one by one
                out = self._run(in_memory_format(x, self._faster_cpu_layout(x)))
        else:  # the interpreter, a forced backend, a trace (compile, make_fx): x's layout
            out = self._run(in_memory_format(x, layout))
        return out.contiguous(memory_format=layout)

    def _faster_cpu_layout(self, x: Tensor) -> torch.memory_format:
        """Where every layer runs aten's by the CPU rule: the faster of NCHW and channels_last
        for this shape and pass, as measured on its first call (in a torch.jit trace of a shape
        not measured yet, the input's)."""
        weights = memory_format_of(self.encoders[0].conv2.weight)  # oneDNN follows them
        config = {**self.config, "weights": str(weights).removeprefix("torch.")}
        return choose_layout("unet", self._run, x, self, config)

    def _run(self, x: Tensor) -> Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        aligned = self.align_corners and self.upsample == "bilinear"  # as ReferenceUNet ignores it
        for level in reversed(range(self.depth)):
            decoder = self.decoders[level]
            if any(GLOBAL_HOOKS) or has_hooks(decoder) or has_hooks(decoder.conv1):
                # Their hooks see the concat, as ReferenceUNet's would: so it is made.
                concat = run_layer(
                    "upsample_concat", ops.upsample_concat, x, skips[level], self.upsample, aligned
                )
                x = decoder(concat)
            else:  # the first conv reads skip and the upsampled x directly: no concat tensor
                x = decoder.conv1.forward_upsampled(x, skips[level], self.upsample, aligned)
                x = decoder.conv2(x)
        return self.head(x)

    @classmethod
    def from_reference(cls, reference: ReferenceUNet) -> UNet:
        """A UNet with the reference's arguments, weights, device, dtype and train/eval mode."""
        return reference.convert_to(cls)

    def to_reference(self) -> ReferenceUNet:
        """The same network in plain PyTorch (for export to ONNX or TensorRT)."""
        return self.convert_to(ReferenceUNet)
