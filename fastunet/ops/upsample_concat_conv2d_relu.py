"""fastunet::upsample_concat_conv2d_relu: a decoder conv that reads skip and x directly.

Forward: `conv2d_relu(upsample_concat(x, skip, mode, align_corners), weight, bias, padding,
relu)`. The Triton kernel loads the first C_skip input channels from skip and the rest from x at
the upsampled coordinates (nearest: PyTorch's source index; bilinear: PyTorch's indices and fp32
weights, rounded to the dtype as the concat tensor would be), so the concat tensor is never
written, and the backward saves x and skip instead of it.

Backward: the ReLU mask and bias gradient as for conv2d_relu; then one op for the gradients of
the concat and the weight, whose Triton grad_weight reads through the same loader. The concat's
gradient splits into grad_skip (the first C_skip channels) and grad_x, the deterministic upsample
backward of the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from fastunet.ops._backend import choose
from fastunet.ops._common import (
    autocast_to_lower_precision,
    conv_layout,
    empty_channels_last,
    in_memory_format,
    kernel_device,
    memory_format_of,
)
from fastunet.ops._eager import call, custom_op, differentiate_by_composite, register_autograd
from fastunet.ops.conv2d_relu import (
    bias_grad_sum,
    check_conv,
    conv2d_grad,
    conv2d_relu,
    conv2d_relu_grad_output,
    conv_grad_flops,
    fake_conv_grads,
)
from fastunet.ops.upsample_concat import _check as check_upsample_concat
from fastunet.ops.upsample_concat import upsample_concat, upsample_input_grad

OP = "upsample_concat_conv2d_relu"


def _check(x, skip, weight, bias, padding, mode, align_corners) -> tuple[int, ...]:
    """Validate the arguments; return the output shape."""
    concat_shape = check_upsample_concat(x, skip, mode, align_corners, OP)
    return check_conv(OP, "cat([skip, upsample(x)])", concat_shape, skip, weight, bias, padding)


def _concat_shape(skip_shape, weight_shape) -> tuple[int, ...]:
    """The shape of cat([skip, upsample(x)], 1), which the op does not make."""
    return (skip_shape[0], weight_shape[1], *skip_shape[2:])


def _triton_kernels(t: Tensor):
    """The conv launchers (whose loader reads the concat from skip and x) if the Triton kernels
    serve this tensor, else None."""
    if not choose(OP, t.device, t.dtype).is_triton:
        return None
    from fastunet.kernels import conv2d_relu as kernels

    return kernels


@custom_op("upsample_concat_conv2d_relu")
def upsample_concat_conv2d_relu(
    x: Tensor,
    skip: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int = 1,
    relu: bool = True,
    mode: str = "nearest",
    align_corners: bool = False,
) -> Tensor:
    """conv2d_relu(upsample_concat(x, skip, mode, align_corners), weight, bias, padding, relu)
    without the concat tensor; returns a channels_last tensor."""
    _check(x, skip, weight, bias, padding, mode, align_corners)
    if kernels := _triton_kernels(x):
        with kernel_device(x):
            concat = (skip, mode, align_corners)
            return kernels.forward(x, weight, bias, padding, relu, concat)
    concat = call(upsample_concat, x, skip, mode, align_corners)
    return call(conv2d_relu, concat, weight, bias, padding, relu)


@upsample_concat_conv2d_relu.register_fake
def _(x, skip, weight, bias=None, padding=1, relu=True, mode="nearest", align_corners=False):
    return empty_channels_last(_check(x, skip, weight, bias, padding, mode, align_corners), x)


@custom_op("upsample_concat_conv2d_grad")
def upsample_concat_conv2d_grad(
    grad: Tensor,
    x: Tensor,
    skip: Tensor,
    weight: Tensor,
    padding: int,
    mode: str,
    align_corners: bool,
    need_input: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(d(loss)/d(concat), d(loss)/d(weight)) given the pre-activation gradient, as
    conv2d_grad: the Triton grad_weight reads the concat through skip and the upsampled x; the
    composite makes the concat and one convolution_backward call."""
    if not (kernels := _triton_kernels(grad)):
        return _grad_composite(grad, x, skip, weight, padding, mode, align_corners, need_input,
                               need_weight)  # fmt: skip
    with kernel_device(grad):
        grad_concat = grad_w = grad.new_empty(0)
        if need_input:
            height, width = skip.shape[2:]
            grad_concat = kernels.grad_input(grad, weight, height, width, padding)
        if need_weight:
            concat = (skip, mode, align_corners)
            kh, kw = weight.shape[2:]
            grad_w = kernels.grad_weight(grad, x, kh, kw, padding, concat)
        return grad_concat, grad_w


def _grad_composite(grad, x, skip, weight, padding, mode, align_corners, need_input, need_weight):
    concat = call(upsample_concat, x, skip, mode, align_corners)
    return call(conv2d_grad, grad, concat, weight, padding, need_input, need_weight)


@upsample_concat_conv2d_grad.register_fake
def _(grad, x, skip, weight, padding, mode, align_corners, need_input, need_weight):
    concat_shape = _concat_shape(skip.shape, weight.shape)
    return fake_conv_grads(grad, concat_shape, weight.shape, need_input, need_weight)


@register_flop_formula(torch.ops.fastunet.upsample_concat_conv2d_relu)
def _(x_shape, skip_shape, weight_shape, *args, out_shape, **kwargs) -> int:
    return conv_flop_count(_concat_shape(skip_shape, weight_shape), weight_shape, out_shape)


@register_flop_formula(torch.ops.fastunet.upsample_concat_conv2d_grad)
def _(grad_shape, x_shape, skip_shape, weight_shape, padding, mode, align_corners, need_input,
      need_weight, **kwargs) -> int:  # fmt: skip
    concat_shape = _concat_shape(skip_shape, weight_shape)
    return conv_grad_flops(concat_shape, weight_shape, grad_shape, need_input, need_weight)


def _setup_context(ctx, inputs, output):
    x, skip, weight, bias, padding, relu, mode, align_corners = inputs
    ctx.save_for_backward(x, skip, weight, output if relu else None)
    ctx.padding, ctx.relu, ctx.has_bias = padding, relu, bias is not None
    ctx.mode, ctx.align_corners = mode, align_corners


def _backward(ctx, grad_out):
    x, skip, weight, out = ctx.saved_tensors
    need_x, need_skip, need_weight = ctx.needs_input_grad[:3]
    need_bias = ctx.has_bias and ctx.needs_input_grad[3]
    grad_bias = None
    if ctx.relu:
        grad, grad_bias = call(conv2d_relu_grad_output, grad_out, out)
    else:
        grad = grad_out
        if need_bias:
            grad_bias = bias_grad_sum(grad_out)
    grad_x = grad_skip = grad_w = None
    need_concat = need_x or need_skip
    if need_concat or need_weight:
        grad_concat, grad_w = call(
            upsample_concat_conv2d_grad, grad, x, skip, weight, ctx.padding, ctx.mode,
            ctx.align_corners, need_concat, need_weight,
        )  # fmt: skip
    if need_concat:
        # The layouts of the composite's gradients: its convolution's input gradient, split.
        grad_concat = in_memory_format(grad_concat, conv_layout(skip, weight))
        c_skip = skip.shape[1]
        if need_skip:
            grad_skip = grad_concat[:, :c_skip]
        if need_x:
            grad_up = grad_concat[:, c_skip:]
            grad_x = upsample_input_grad(grad_up, *x.shape[2:], ctx.mode, ctx.align_corners)
    grad_w = in_memory_format(grad_w, memory_format_of(weight)) if need_weight else None
    grad_bias = grad_bias if need_bias else None
    return grad_x, grad_skip, grad_w, grad_bias, None, None, None, None


register_autograd(upsample_concat_conv2d_relu, _backward, _setup_context)
differentiate_by_composite(upsample_concat_conv2d_grad, _grad_composite)
autocast_to_lower_precision(OP)
