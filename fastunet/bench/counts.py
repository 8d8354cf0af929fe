"""FLOPs and bytes of each op and of the whole UNet, from the shapes alone.

FLOPs count the convolutions' multiply-adds x 2, as torch.utils.flop_counter does. Bytes are what
each fastunet op must read and write at the least: every input once, every output once (the
uint8 argmax is one byte an element). The model's bytes are the sum over its op calls; the
tests check both counts against the real model.
"""

from __future__ import annotations

from fastunet.bench.shapes import ConvShape, PoolShape, UpsampleShape, unet_shapes


def conv_counts(s: ConvShape, element_size: int, backward: bool, input_grad: bool = True) -> dict:
    x = s.batch * s.in_channels * s.height * s.width
    y = s.batch * s.out_channels * s.height * s.width
    w = s.out_channels * s.in_channels * s.kernel**2
    b = s.out_channels
    flops, elements = s.flops(), x + w + b + y
    if backward:
        grad = y  # the gradient of the pre-activation output
        if s.relu:  # the ReLU mask and bias gradient: reads grad_out and out
            elements += y + y + grad + b
        # grad_input and grad_weight, one op: reads grad, x and weight, writes the gradients
        flops += s.flops() * (2 if input_grad else 1)
        elements += grad + x + w + w + (x if input_grad else 0)
    return {"flops": flops, "bytes": elements * element_size}


def pool_counts(s: PoolShape, element_size: int, backward: bool) -> dict:
    x = s.batch * s.channels * s.height * s.width
    y = s.batch * s.channels * (s.height // 2) * (s.width // 2)
    nbytes = (x + y) * element_size + y  # + the uint8 argmax
    if backward:
        nbytes += (y + x) * element_size + y
    return {"flops": 0, "bytes": nbytes}


def upsample_counts(s: UpsampleShape, element_size: int, backward: bool) -> dict:
    x = s.batch * s.x_channels * s.x_height * s.x_width
    skip = s.batch * s.skip_channels * s.height * s.width
    up = s.batch * s.x_channels * s.height * s.width
    elements = x + skip + (skip + up)
    if backward:  # grad_skip is a view of grad_out; grad_x reads the upsampled channels' gradient
        elements += up + x
    return {"flops": 0, "bytes": elements * element_size}


def decoder_conv_counts(
    conv: ConvShape, up: UpsampleShape, element_size: int, backward: bool
) -> dict:
    """upsample_concat_conv2d_relu: the conv's counts with skip and x read in place of the
    concat; its backward still forms the concat's gradient, which the upsample backward reads."""
    x = up.batch * up.x_channels * up.x_height * up.x_width
    skip = up.batch * up.skip_channels * up.height * up.width
    upsampled = up.batch * up.x_channels * up.height * up.width
    y = conv.batch * conv.out_channels * conv.height * conv.width
    w = conv.out_channels * conv.in_channels * conv.kernel**2
    b = conv.out_channels
    flops, elements = conv.flops(), x + skip + w + b + y
    if backward:
        grad = y
        elements += y + y + grad + b  # the ReLU mask and bias gradient
        # The gradients of the concat and the weight, one op: reads grad, x, skip and weight
        # (grad_weight through the fused loader), writes the concat's gradient and grad_weight.
        elements += grad + x + skip + w + (skip + upsampled) + w
        elements += upsampled + x  # grad_x, the upsample backward of its x channels
        flops += 2 * conv.flops()
    return {"flops": flops, "bytes": elements * element_size}


def model_counts(
    batch: int,
    size: int | tuple[int, int],
    base_channels: int = 64,
    depth: int = 4,
    in_channels: int = 3,
    num_classes: int = 2,
    element_size: int = 2,
    backward: bool = False,
) -> dict:
    """FLOPs and bytes of one UNet forward (and backward, without the optimizer step)."""
    shapes = unet_shapes(batch, size, base_channels, depth, in_channels, num_classes)
    upsample_of = {f"dec{s.name.removeprefix('up')}.conv1": s for s in shapes["upsample"]}
    parts = [
        decoder_conv_counts(s, upsample_of[s.name], element_size, backward)
        if s.name in upsample_of  # UNet's decoders read skip and x without a concat
        else conv_counts(s, element_size, backward, input_grad=i > 0)
        for i, s in enumerate(shapes["conv"])
    ]
    parts += [pool_counts(s, element_size, backward) for s in shapes["pool"]]
    return {key: sum(p[key] for p in parts) for key in ("flops", "bytes")}
