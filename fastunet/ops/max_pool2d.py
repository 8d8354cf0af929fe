"""fastunet::max_pool2d_with_argmax: `F.max_pool2d(x, 2)` and a uint8 argmax for the backward.

Kernel 2, stride 2, floor mode; NaN wins its window and ties pick the first position, as in
PyTorch. The argmax is the position in the 2x2 window (0..3, row-major), one byte per output
element where PyTorch saves an int64 index. The output follows the input's memory format.

Backends (see `fastunet.ops._backend`): the `fastunet._C` CUDA kernels for CUDA tensors and
their C++ twin for CPU tensors, else the torch composite below (float64, FASTUNET_BACKEND=torch,
or `_C` not built). `_C` takes raw pointers, so tensors are made dense first and its outputs are
allocated here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunet.ops._backend import choose, native_extension
from fastunet.ops._common import check_activation, memory_format_of, refuse_forward_ad
from fastunet.ops._eager import call, custom_op, differentiate_by_composite, register_autograd

OP = "max_pool2d"


def _check(x: Tensor) -> tuple[int, ...]:
    """Validate x; return the output shape."""
    refuse_forward_ad(OP)
    check_activation(OP, "x", x)
    n, c, h, w = x.shape
    if c == 0:  # as PyTorch's max_pool2d, which takes a batch of none but not no channels
        raise ValueError(f"{OP}: x has no channels, shape {tuple(x.shape)}")
    if h < 2 or w < 2:
        raise ValueError(f"{OP}: H and W must be >= 2 for a 2x2 window, got shape {tuple(x.shape)}")
    return n, c, h // 2, w // 2


def _empty_like_layout(shape, x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=memory_format_of(x))


def _uses_native(t: Tensor) -> bool:
    backend = choose(OP, t.device, t.dtype)
    if backend.name == "unsupported":
        raise RuntimeError(f"{OP}: {backend.reason}")
    return backend.name in ("_C.cpu", "_C.cuda")


def _run_native(name: str, full: Tensor, *pointers: int) -> None:
    """Calls `_C.<name>_cpu` or `_C.<name>_cuda` on full's device and torch's current stream;
    full is the dense (N, C, H, W) tensor (x, or grad_input), whose layout the others share."""
    ext = native_extension()
    dtype = getattr(ext.DType, str(full.dtype).removeprefix("torch."))
    args = (*pointers, full.shape, full.stride(), dtype)
    if full.device.type == "cuda":
        stream = torch.cuda.current_stream(full.device).cuda_stream
        getattr(ext, f"{name}_cuda")(*args, full.device.index, stream)
    else:
        getattr(ext, f"{name}_cpu")(*args, torch.get_num_threads())


@custom_op("max_pool2d_with_argmax")
def max_pool2d_with_argmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """2x2 max-pool; returns (output, argmax) where argmax is the uint8 window position."""
    shape = _check(x)
    layout = memory_format_of(x)
    if _uses_native(x):
        x = x.contiguous(memory_format=layout)
        out = _empty_like_layout(shape, x, x.dtype)
        argmax = _empty_like_layout(shape, x, torch.uint8)
        _run_native("max_pool2d_forward", x, x.data_ptr(), out.data_ptr(), argmax.data_ptr())
        return out, argmax
    out, index = F.max_pool2d_with_indices(x, 2)
    # index is h * W + w in the input plane; the window of output (i, j) starts at (2i, 2j).
    h_out, w_out = out.shape[-2:]
    rows = torch.arange(h_out, device=x.device).view(-1, 1)
    cols = torch.arange(w_out, device=x.device).view(1, -1)
    width = x.shape[-1]
    argmax = (index // width - 2 * rows) * 2 + (index % width - 2 * cols)
    return out.contiguous(memory_format=layout), argmax.to(torch.uint8).contiguous(
        memory_format=layout
    )


@max_pool2d_with_argmax.register_fake
def _(x):
    shape = _check(x)
    return _empty_like_layout(shape, x, x.dtype), _empty_like_layout(shape, x, torch.uint8)


def _check_backward(grad_out: Tensor, argmax: Tensor, input_height: int, input_width: int):
    """The sizes must agree: the kernels address memory from them."""
    pooled = (*grad_out.shape[:2], input_height // 2, input_width // 2)
    if grad_out.dim() != 4 or tuple(grad_out.shape) != pooled or argmax.shape != grad_out.shape:
        raise ValueError(
            f"{OP}: grad_out {tuple(grad_out.shape)} and argmax {tuple(argmax.shape)} must both be "
            f"the pooled shape of an input of height {input_height} and width {input_width}"
        )
    if argmax.dtype != torch.uint8 or argmax.device != grad_out.device:
        raise ValueError(
            f"{OP}: argmax must be uint8 on {grad_out.device}, got {argmax.dtype} "
            f"on {argmax.device}"
        )


@custom_op("max_pool2d_backward")
def max_pool2d_backward(
    grad_out: Tensor, argmax: Tensor, input_height: int, input_width: int
) -> Tensor:
    """Each input element gets its window's gradient if it was the window's argmax, else 0."""
    _check_backward(grad_out, argmax, input_height, input_width)
    if _uses_native(grad_out):
        n, c = grad_out.shape[:2]
        layout = memory_format_of(argmax)
        grad_out = grad_out.contiguous(memory_format=layout)
        argmax = argmax.contiguous(memory_format=layout)
        grad = _empty_like_layout((n, c, input_height, input_width), argmax, grad_out.dtype)
        _run_native(
            "max_pool2d_backward", grad, grad_out.data_ptr(), argmax.data_ptr(), grad.data_ptr()
        )
        return grad
    return _backward_composite(grad_out, argmax, input_height, input_width)


def _backward_composite(grad_out: Tensor, argmax: Tensor, input_height: int, input_width: int):
    n, c, h_out, w_out = grad_out.shape
    positions = torch.arange(4, device=argmax.device).view(1, 1, 1, 1, 2, 2)
    chosen = argmax[..., None, None] == positions
    # + 0.0: PyTorch adds the gradient into zeros, which turns a -0.0 into +0.0.
    windows = torch.where(chosen, grad_out[..., None, None], 0) + 0.0
    # (n, c, i, j, dy, dx) -> (n, c, 2i + dy, 2j + dx), then zeros for a dropped row/column.
    grad = windows.permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h_out, 2 * w_out)
    grad = F.pad(grad, (0, input_width - 2 * w_out, 0, input_height - 2 * h_out))
    return grad.contiguous(memory_format=memory_format_of(argmax))


@max_pool2d_backward.register_fake
def _(grad_out, argmax, input_height, input_width):
    shape = (grad_out.shape[0], grad_out.shape[1], input_height, input_width)
    return _empty_like_layout(shape, argmax, grad_out.dtype)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(argmax)
    ctx.input_size = x.shape[2], x.shape[3]


def _backward(ctx, grad_out, _grad_argmax):
    (argmax,) = ctx.saved_tensors
    return call(max_pool2d_backward, grad_out, argmax, *ctx.input_size)


register_autograd(max_pool2d_with_argmax, _backward, _setup_context)
differentiate_by_composite(max_pool2d_backward, _backward_composite)


def max_pool2d(x: Tensor) -> Tensor:
    """`F.max_pool2d(x, 2)`; its backward saves one byte per output element."""
    return call(max_pool2d_with_argmax, x)[0]
