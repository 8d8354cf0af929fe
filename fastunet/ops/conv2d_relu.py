"""fastunet::conv2d_relu: `F.conv2d(x, weight, bias, padding=padding)`, then ReLU when relu
(LeakyReLU when negative_slope > 0).

Stride 1, dilation 1, groups 1, zero padding. The output is channels_last. Its backward is two
ops: the activation's mask with the bias gradient (one pass over grad_output), then grad_input
and grad_weight together. The mask is read from the output, which has the pre-activation's sign
because the slope is >= 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from fastunet.ops._backend import choose
from fastunet.ops._common import (
    CHANNELS_LAST,
    autocast_to_lower_precision,
    check_activation,
    check_floating,
    check_same_device_and_dtype,
    conv_layout,
    empty_channels_last,
    in_memory_format,
    kernel_device,
    memory_format_of,
    refuse_forward_ad,
)
from fastunet.ops._eager import call, custom_op, differentiate_by_composite, register_autograd

OP = "conv2d_relu"
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, relu: bool, negative_slope: float
) -> tuple[int, ...]:
    """Validate the arguments; return the output shape."""
    refuse_forward_ad(OP)
    check_activation(OP, "x", x)
    if not negative_slope >= 0 or math.isinf(negative_slope):
        raise ValueError(
            f"{OP}: negative_slope must be finite and >= 0 (the backward reads the sign from the "
            f"output), got {negative_slope}"
        )
    if negative_slope and not relu:
        raise ValueError(f"{OP}: negative_slope={negative_slope} needs relu=True")
    return check_conv(OP, "x", x.shape, x, weight, bias, padding)


def check_conv(op: str, name: str, x_shape, x: Tensor, weight: Tensor, bias, padding: int):
    """Validate weight, bias and padding for an input `name` of x_shape whose device and dtype
    are x's (the decoder op's input is a concat that is never made); return the output shape."""
    check_floating(op, "weight", weight)
    if weight.dim() != 4:
        raise ValueError(
            f"{op}: weight must be 4-D (C_out, C_in, KH, KW), got shape {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    check_same_device_and_dtype(op, x=x, weight=weight, bias=bias)
    n, c_in, h, w = x_shape
    c_out, weight_c_in, kh, kw = weight.shape
    if c_in != weight_c_in:
        raise ValueError(
            f"{op}: {name} has {c_in} channels (shape {tuple(x_shape)}) but weight expects "
            f"{weight_c_in} (shape {tuple(weight.shape)})"
        )
    if c_out == 0:  # as PyTorch's conv2d
        raise ValueError(f"{op}: weight has no output channels, shape {tuple(weight.shape)}")
    if c_in == 0 or h == 0 or w == 0:
        # PyTorch's conv2d errs on an empty image, and for no channels returns an empty
        # (N, 0, H_out, W_out) tensor, not C_out channels of bias.
        raise ValueError(
            f"{op}: {name} has no channels or an empty spatial size, shape {tuple(x_shape)}"
        )
    if padding < 0:
        raise ValueError(f"{op}: padding must be >= 0, got {padding}")
    h_out, w_out = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"{op}: input {h}x{w} with padding {padding} is smaller than the {kh}x{kw} kernel"
        )
    return n, c_out, h_out, w_out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The composite accumulates in fp32 for fp16 and bf16, like the kernels."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _upcast(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(_compute_dtype(t.dtype))


def bias_grad_sum(grad: Tensor) -> Tensor:
    """grad summed over N, H, W in fp32, or in float64 for float64."""
    return grad.sum((0, 2, 3), dtype=_compute_dtype(grad.dtype)).to(grad.dtype)


def _triton_kernels(t: Tensor):
    """The Triton launchers if they serve this tensor (imported on first use), else None."""
    if not choose(OP, t.device, t.dtype).is_triton:
        return None
    from fastunet.kernels import conv2d_relu as kernels

    return kernels


@custom_op("conv2d_relu")
def conv2d_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int = 1,
    relu: bool = True,
    negative_slope: float = 0.0,
) -> Tensor:
    """Convolution (stride 1) + bias + ReLU (LeakyReLU with negative_slope > 0) in one op;
    returns a channels_last tensor."""
    _check(x, weight, bias, padding, relu, negative_slope)
    if kernels := _triton_kernels(x):
        with kernel_device(x):
            return kernels.forward(x, weight, bias, padding, relu, negative_slope=negative_slope)
    # Rounded to x's dtype before the activation, as PyTorch's conv2d then leaky_relu: an fp16
    # convolution that overflows is -inf, whatever the slope.
    out = F.conv2d(_upcast(x), _upcast(weight), _upcast(bias), padding=padding).to(x.dtype)
    if relu:
        out = F.leaky_relu(out, negative_slope) if negative_slope else torch.relu(out)
    return out.contiguous(memory_format=CHANNELS_LAST)


@conv2d_relu.register_fake
def _(x, weight, bias=None, padding=1, relu=True, negative_slope=0.0):
    return empty_channels_last(_check(x, weight, bias, padding, relu, negative_slope), x)


@custom_op("conv2d_relu_grad_output")
def conv2d_relu_grad_output(
    grad_out: Tensor, out: Tensor, negative_slope: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The gradient through the ReLU (zero where out <= 0), or the LeakyReLU (times
    negative_slope where out <= 0), and its sum over N, H, W (grad_bias)."""
    if kernels := _triton_kernels(out):
        with kernel_device(out):
            return kernels.relu_grad(grad_out, out, negative_slope)
    return _relu_grad_composite(grad_out, out, negative_slope)


def _relu_grad_composite(grad_out: Tensor, out: Tensor, negative_slope: float):
    # As PyTorch's backwards: ReLU's zeroes where out <= 0, so a NaN output passes the gradient;
    # LeakyReLU's keeps it where out > 0, so a NaN output scales it.
    if negative_slope:
        grad = torch.where(out > 0, grad_out, grad_out * negative_slope)
    else:
        grad = torch.where(out <= 0, 0, grad_out)
    grad = grad.contiguous(memory_format=CHANNELS_LAST)
    return grad, bias_grad_sum(grad)


@conv2d_relu_grad_output.register_fake
def _(grad_out, out, negative_slope=0.0):
    return empty_channels_last(out.shape, out), out.new_empty(out.shape[1])


@custom_op("conv2d_grad")
def conv2d_grad(
    grad: Tensor, x: Tensor, weight: Tensor, padding: int, need_input: bool, need_weight: bool
) -> tuple[Tensor, Tensor]:
    """(d(loss)/d(x), d(loss)/d(weight)) of the convolution, given the gradient of its
    pre-activation output; an empty tensor in place of one not needed.

    One op for both because PyTorch computes them best together: the composite makes one
    convolution_backward call, which on the CPU (oneDNN) shares the layout work between them.
    """
    if kernels := _triton_kernels(grad):
        with kernel_device(grad):
            grad_x = grad_w = grad.new_empty(0)
            if need_input:
                grad_x = kernels.grad_input(grad, weight, x.shape[2], x.shape[3], padding)
            if need_weight:
                grad_w = kernels.grad_weight(grad, x, weight.shape[2], weight.shape[3], padding)
            return grad_x, grad_w
    return _conv_grad_composite(grad, x, weight, padding, need_input, need_weight)


def _conv_grad_composite(grad, x, weight, padding, need_input, need_weight):
    # A dense weight: aten's slow CPU path writes grad_weight in the weight's layout, and
    # refuses a permuted one.
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        _upcast(grad), _upcast(x), _upcast(weight).contiguous(), None, stride=[1, 1],
        padding=[padding] * 2, dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1,
        output_mask=[need_input, need_weight, False],
    )  # fmt: skip
    not_needed = grad.new_empty(0)  # a custom op cannot return None
    return (
        not_needed if grad_x is None
        else grad_x.to(grad.dtype).contiguous(memory_format=CHANNELS_LAST),
        not_needed if grad_w is None else grad_w.to(grad.dtype).contiguous(),
    )  # fmt: skip


def fake_conv_grads(grad: Tensor, input_shape, weight_shape, need_input: bool, need_weight: bool):
    """The fake (input gradient, weight gradient) of conv2d_grad and the decoder's grad op."""
    grad_input = empty_channels_last(input_shape, grad) if need_input else grad.new_empty(0)
    grad_weight = grad.new_empty(weight_shape) if need_weight else grad.new_empty(0)
    return grad_input, grad_weight


@conv2d_grad.register_fake
def _(grad, x, weight, padding, need_input, need_weight):
    return fake_conv_grads(grad, x.shape, weight.shape, need_input, need_weight)


def conv_grad_flops(x_shape, weight_shape, grad_shape, need_input: bool, need_weight: bool) -> int:
    """FLOPs of a convolution's (stride 1) input and weight gradients, as FlopCounterMode counts
    aten's convolution_backward: each costs what the convolution does."""
    return (need_input + need_weight) * conv_flop_count(x_shape, weight_shape, grad_shape)


# FlopCounterMode sees the custom ops, not the convolutions inside: without a formula, a model
# on the ops counts no FLOPs.
@register_flop_formula(torch.ops.fastunet.conv2d_relu)
def _(x_shape, weight_shape, *args, out_shape, **kwargs) -> int:
    return conv_flop_count(x_shape, weight_shape, out_shape)


@register_flop_formula(torch.ops.fastunet.conv2d_grad)
def _(grad_shape, x_shape, weight_shape, padding, need_input, need_weight, **kwargs) -> int:
    return conv_grad_flops(x_shape, weight_shape, grad_shape, need_input, need_weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding, relu, negative_slope = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.padding, ctx.relu, ctx.has_bias = padding, relu, bias is not None
    ctx.negative_slope = negative_slope


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    # needs_input_grad lists the tensor inputs given: (x, weight) or (x, weight, bias).
    need_x, need_weight = ctx.needs_input_grad[:2]
    need_bias = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.relu:
        grad, grad_bias = call(conv2d_relu_grad_output, grad_out, out, ctx.negative_slope)
    else:
        grad = grad_out
        if need_bias:
            grad_bias = bias_grad_sum(grad_out)
    grad_x = grad_w = None
    if need_x or need_weight:
        grad_x, grad_w = call(conv2d_grad, grad, x, weight, ctx.padding, need_x, need_weight)
    # As PyTorch's convolution: autograd would restride a weight's gradient to the weight's
    # layout anyway (its layout contract for .grad).
    if need_x:
        grad_x = in_memory_format(grad_x, conv_layout(x, weight))
    if need_weight:
        grad_w = in_memory_format(grad_w, memory_format_of(weight))
    return (
        grad_x if need_x else None, grad_w if need_weight else None,
        grad_bias if need_bias else None, None, None, None,
    )  # fmt: skip


register_autograd(conv2d_relu, _backward, _setup_context)
differentiate_by_composite(conv2d_relu_grad_output, _relu_grad_composite)
differentiate_by_composite(conv2d_grad, _conv_grad_composite)
autocast_to_lower_precision("conv2d_relu")
