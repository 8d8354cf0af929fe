"""The op layer: torch.library custom ops in namespace `fastunet`, one module per fused op.

Each op validates its input, picks its backend per call (see `fastunet.info()`), has a fake
(shape) kernel for torch.compile, an autograd formula whose backward steps are ops too, and an
autocast rule. The layers call them through `fastunet.ops._eager.call`, which in plain eager
PyTorch runs the same function and formula without the dispatcher's round trips.
"""

from fastunet.ops.conv2d_relu import conv2d_relu
from fastunet.ops.max_pool2d import max_pool2d, max_pool2d_with_argmax
from fastunet.ops.upsample_concat import upsample_concat
from fastunet.ops.upsample_concat_conv2d_relu import upsample_concat_conv2d_relu

__all__ = [
    "conv2d_relu",
    "max_pool2d",
    "max_pool2d_with_argmax",
    "upsample_concat",
    "upsample_concat_conv2d_relu",
]
