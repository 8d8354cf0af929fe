"""fastunet::upsample_concat: `torch.cat([skip, F.interpolate(x, size=skip.shape[-2:])], 1)`,
or `torch.cat([F.interpolate(...), skip], 1)` with skip_first=False.

Modes "nearest" (PyTorch's index rule) and "bilinear" (align_corners False or True). The output is
channels_last. grad_skip is the matching channel slice of grad_output; grad_x, the adjoint of the
upsample, is its own op so that the kernel behind it can gather deterministically.

Backends: the Triton kernels of `fastunet.kernels.upsample_concat` where `choose` says so (CUDA
tensors, and CPU tensors under TRITON_INTERPRET=1), else a torch composite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunet.ops._backend import choose
from fastunet.ops._common import (
    CHANNELS_LAST,
    autocast_to_widest,
    check_activation,
    check_same_device_and_dtype,
    empty_channels_last,
    in_memory_format,
    kernel_device,
    memory_format_of,
    refuse_forward_ad,
)
from fastunet.ops._eager import call, custom_op, differentiate_by_composite, register_autograd

OP = "upsample_concat"
MODES = ("nearest", "bilinear")


def check_mode(op: str, mode: str, align_corners: bool) -> None:
    """The upsampling the kernels compute; `op` names the op or layer in the errors."""
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if align_corners and mode == "nearest":  # as F.interpolate refuses it
        raise ValueError(f"{op}: align_corners=True is for mode 'bilinear', not 'nearest'")


def _check(
    x: Tensor, skip: Tensor, mode: str, align_corners: bool, op: str = OP
) -> tuple[int, ...]:
    """Validate the arguments; return the output shape. `op` names the op in the errors."""
    refuse_forward_ad(op)
    check_activation(op, "x", x)
    check_activation(op, "skip", skip)
    check_mode(op, mode, align_corners)
    check_same_device_and_dtype(op, x=x, skip=skip)
    if x.shape[0] != skip.shape[0]:
        raise ValueError(
            f"{op}: x has batch {x.shape[0]} (shape {tuple(x.shape)}) but skip has batch "
            f"{skip.shape[0]} (shape {tuple(skip.shape)})"
        )
    # F.interpolate needs a non-empty x and output size, in a batch of any size (0 too); every
    # backend says so the same way.
    if 0 in x.shape[1:]:
        raise ValueError(
            f"{op}: x has no channels or an empty spatial size, shape {tuple(x.shape)}"
        )
    if 0 in skip.shape[2:]:
        raise ValueError(f"{op}: skip has an empty spatial size, shape {tuple(skip.shape)}")
    n, c_skip, h, w = skip.shape
    return n, c_skip + x.shape[1], h, w


def _interpolate(x: Tensor, size, mode: str, align_corners: bool) -> Tensor:
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


@custom_op("upsample_concat")
def upsample_concat(
    x: Tensor,
    skip: Tensor,
    mode: str = "nearest",
    align_corners: bool = False,
    skip_first: bool = True,
) -> Tensor:
    """Upsample x to skip's H, W and concatenate [skip, upsampled] on channels (or [upsampled,
    skip] when not skip_first), channels_last."""
    out = empty_channels_last(_check(x, skip, mode, align_corners), skip)
    if choose(OP, x.device, x.dtype).is_triton:
        from fastunet.kernels.upsample_concat import upsample_concat_forward

        with kernel_device(x):
            return upsample_concat_forward(x, skip, mode, align_corners, out, skip_first)
    skip_part, up_part = _parts(out, skip.shape[1], x.shape[1], skip_first)
    skip_part.copy_(skip)
    up_part.copy_(_interpolate(x, skip.shape[-2:], mode, align_corners))
    return out


def _parts(t: Tensor, c_skip: int, c_x: int, skip_first: bool) -> tuple[Tensor, Tensor]:
    """The (skip, upsampled) channel slices of a concat or of its gradient."""
    if skip_first:
        return t[:, :c_skip], t[:, c_skip:]
    return t[:, c_x:], t[:, :c_x]


@upsample_concat.register_fake
def _(x, skip, mode="nearest", align_corners=False, skip_first=True):
    return empty_channels_last(_check(x, skip, mode, align_corners), skip)


@custom_op("upsample_grad")
def upsample_grad(
    grad_up: Tensor, input_height: int, input_width: int, mode: str, align_corners: bool
) -> Tensor:
    """The adjoint of the upsample: d(loss)/d(x) from the gradient of the upsampled channels."""
    x_shape = (grad_up.shape[0], grad_up.shape[1], input_height, input_width)
    if choose(OP, grad_up.device, grad_up.dtype).is_triton:
        from fastunet.kernels.upsample_concat import upsample_backward

        with kernel_device(grad_up):
            return upsample_backward(
                grad_up, mode, align_corners, empty_channels_last(x_shape, grad_up)
            )
    return _upsample_grad_composite(grad_up, input_height, input_width, mode, align_corners)


def _upsample_grad_composite(grad_up, input_height, input_width, mode, align_corners):
    x_shape = (grad_up.shape[0], grad_up.shape[1], input_height, input_width)
    dtype = grad_up.dtype
    compute_dtype = torch.float64 if grad_up.dtype == torch.float64 else torch.float32
    grad_up = grad_up.to(compute_dtype)
    if mode == "nearest":
        grad_x = torch.ops.aten.upsample_nearest2d_backward(grad_up, grad_up.shape[-2:], x_shape)
    else:
        grad_x = torch.ops.aten.upsample_bilinear2d_backward(
            grad_up, grad_up.shape[-2:], x_shape, align_corners
        )
    return grad_x.to(dtype).contiguous(memory_format=CHANNELS_LAST)


@upsample_grad.register_fake
def _(grad_up, input_height, input_width, mode, align_corners):
    return empty_channels_last(
        (grad_up.shape[0], grad_up.shape[1], input_height, input_width), grad_up
    )


def upsample_input_grad(grad_up: Tensor, height: int, width: int, mode: str, align_corners: bool):
    """d(loss)/d(x) of the upsample, in grad_up's layout, as F.interpolate's backward gives it."""
    grad_x = call(upsample_grad, grad_up, height, width, mode, align_corners)
    return in_memory_format(grad_x, memory_format_of(grad_up))


def _setup_context(ctx, inputs, output):
    x, skip, mode, align_corners, skip_first = inputs
    ctx.x_size = x.shape[2], x.shape[3]
    ctx.channels = skip.shape[1], x.shape[1], skip_first
    ctx.mode, ctx.align_corners = mode, align_corners


def _backward(ctx, grad_out):
    need_x, need_skip = ctx.needs_input_grad[:2]
    grad_skip, grad_up = _parts(grad_out, *ctx.channels)
    grad_x = None
    if need_x:
        grad_x = upsample_input_grad(grad_up, *ctx.x_size, ctx.mode, ctx.align_corners)
    return grad_x, grad_skip if need_skip else None, None, None, None


register_autograd(upsample_concat, _backward, _setup_context)
differentiate_by_composite(upsample_grad, _upsample_grad_composite)
autocast_to_widest("upsample_concat")
