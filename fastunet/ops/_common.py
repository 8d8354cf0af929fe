"""Input checks, layout helpers, autocast rules and file writing shared by the ops and the
command line."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad

from fastunet.kernels import cudnn_convolves

CHANNELS_LAST = torch.channels_last
# The vmap that autograd itself runs (jacobian(vectorize=True), grad(is_grads_batched=True)):
# its batched tensors are of class Tensor, so only the thread's dispatch keys tell.
LEGACY_VMAP = torch._C._parse_dispatch_key("VmapMode")

# The hooks registered for every module (nn.modules.module.register_module_forward_hook, ...):
# dicts that registering adds to in place.
GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, {})
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")
)  # fmt: skip


def in_functorch_transform() -> bool:
    """Inside vmap, grad or another torch.func transform."""
    return torch._C._functorch.maybe_current_level() is not None


def in_legacy_vmap() -> bool:
    # Never under torch.compile, whose tracing cannot read the thread's dispatch keys.
    return not torch.compiler.is_compiling() and torch._C._dispatch_tls_is_dispatch_key_included(
        LEGACY_VMAP
    )


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether a hook of the module's own would see its input or output."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def watched(model: torch.nn.Module) -> bool:
    """Whether extra runs of the model would be seen: hooks on its modules (its own or every
    module's) or on its parameters' gradients."""
    return (
        any(GLOBAL_HOOKS)
        or any(map(has_hooks, model.modules()))
        or any(p._backward_hooks or p._post_accumulate_grad_hooks for p in model.parameters())
    )


def check_activation(op: str, name: str, t: torch.Tensor) -> None:
    """A 4-D floating-point (N, C, H, W) tensor, else a clear error naming the shape or dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    check_floating(op, name, t)


def refuse_forward_ad(op: str) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported: a custom op
    with register_autograd drops the tangents without an error (torch 2.13), which would give
    zero where the derivative is not. Its dual level is what can be seen from inside the op."""
    if forward_ad._current_level >= 0:
        raise RuntimeError(
            f"{op}: fastunet's ops have no forward-mode AD (torch.func.jvp, jacfwd, "
            "torch.autograd.forward_ad); PyTorch would silently drop the tangent. Use "
            "reverse mode, or model.to_reference() (the original model, for accelerate)"
        )


def refuse_functorch_grad(op: str, args: tuple) -> None:
    """torch.func.grad, vjp and jacrev cannot differentiate a custom op with register_autograd
    (torch 2.13: its autograd.Function has no setup_context for functorch); PyTorch's error says
    so without naming the op or the way out. Only where the innermost transform tracks an
    input: grad of a function whose fastunet layers do not depend on its argument works."""
    if torch._C._functorch.peek_interpreter_stack().key() != TransformType.Grad:
        return
    if any(isinstance(a, torch.Tensor) and torch._C._functorch.is_gradtrackingtensor(a)
           for a in args):  # fmt: skip
        raise RuntimeError(
            f"{op}: torch.func.grad, vjp and jacrev cannot differentiate fastunet's ops (their "
            "autograd is torch.autograd's). Use torch.autograd.grad "
            "(torch.autograd.functional.jacobian for a Jacobian), or model.to_reference() "
            "(the original model, for accelerate)"
        )


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_same_device_and_dtype(op: str, **tensors: torch.Tensor | None) -> None:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; "
                "cast them to one dtype (or run under torch.autocast)"
            )


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout PyTorch's own ops read from x's strides (`suggest_memory_format` in c10), so an
    op hands on the layout PyTorch's would: channels_last for a 4-D tensor whose strides step
    channels fastest, then width, height and batch (a view too); where they fit both layouts
    (one channel, a 1x1 image), the order of the strides' values decides, and a tie is NCHW.
    Unrolled: every layer call asks, and a loop cost 2 us."""
    if x.dim() != 4:
        return torch.contiguous_format
    (n, c, h, w), (stride_n, stride_c, stride_h, stride_w) = x.shape, x.stride()
    if stride_c == 0 or 0 in (n, c, h, w):
        return torch.contiguous_format
    # Each stride, in the order c, w, h, n, must reach past the span of the one before.
    span = stride_c * c if c > 1 else stride_c
    if stride_w < span:
        return torch.contiguous_format
    span = stride_w * w if w > 1 else stride_w
    if stride_h < span:
        return torch.contiguous_format
    span = stride_h * h if h > 1 else stride_h
    if stride_n < span or span == stride_c:
        return torch.contiguous_format
    return CHANNELS_LAST


def conv_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout of PyTorch's convolution output: channels_last where its input or its weight
    is, except on CUDA where cuDNN does not compute it: for float64 PyTorch asks cuDNN for NCHW,
    and with cuDNN off or not built its own CUDA kernels compute NCHW. (Not covered: bf16 on
    GPUs before Ampere and inputs too large for cuDNN, which PyTorch's own kernels compute NCHW
    too.)"""
    if CHANNELS_LAST not in (memory_format_of(x), memory_format_of(weight)):
        return torch.contiguous_format
    if x.is_cuda and (x.dtype == torch.float64 or not cudnn_convolves()):
        return torch.contiguous_format
    return CHANNELS_LAST


def in_memory_format(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """x.contiguous(memory_format=layout), with that layout's own strides. Where x's strides
    fit both layouts (one channel, a 1x1 image), `contiguous` returns x as it is, and PyTorch's
    convolutions, which read the layout from the strides, then compute and hand on the other
    one: a one-channel input could never run channels_last. The restrided tensor is a view of
    the same elements (a dimension of size 1 is never stepped along), not a copy. Under
    autograd's own vmap x as it is: its batched tensors take no layout but NCHW (and one
    sample's strides are not seen)."""
    if in_legacy_vmap():
        return x
    x = x.contiguous(memory_format=layout)
    if x.dim() != 4 or x.numel() == 0:
        return x
    c, h, w = x.shape[1:]
    dense = (c * h * w, 1, w * c, c) if layout == CHANNELS_LAST else (c * h * w, h * w, w, 1)
    return x if x.stride() == dense else x.as_strided(x.shape, dense)


def write_atomically(path: Path, text: str) -> None:
    """path holds the old text or the new, never a part: a reader never sees half a file, and
    a failed write (a full disk) keeps the old one. The temporary file is named by the process,
    so processes do not share it; threads of one process must write one at a time."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def empty_channels_last(
    shape, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    return torch.empty(
        shape, dtype=dtype or like.dtype, device=like.device, memory_format=CHANNELS_LAST
    )


def kernel_device(t: torch.Tensor):
    """Triton launches on the current CUDA device and stream: make that device t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cast_floating(args: tuple, device_type: str, dtype: torch.dtype) -> tuple:
    """args, with the floating tensors on device_type other than float64 cast to dtype."""

    def cast(a):
        if (
            isinstance(a, torch.Tensor)
            and a.is_floating_point()
            and a.device.type == device_type
            and a.dtype != torch.float64
        ):
            return a.to(dtype)
        return a

    return tuple(cast(a) for a in args)


def _lower_precision(args: tuple, device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type)


def _widest_floating(args: tuple, device_type: str) -> torch.dtype:
    dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    widest = dtypes[0]
    for d in dtypes[1:]:
        widest = torch.promote_types(widest, d)
    return widest


# Kept alive for the life of the process: it owns the autocast registrations.
_AUTOCAST_LIB = torch.library.Library("fastunet", "IMPL")
# Each op's autocast rule by name: its dtype under autocast from (args, device type).
AUTOCAST_RULES: dict[str, Callable[[tuple, str], torch.dtype]] = {}


def _register_autocast(name: str, target_dtype: Callable[[tuple, str], torch.dtype]) -> None:
    """Autocast rule for fastunet::<name>: cast, then run the op with autocast off."""
    op = getattr(torch.ops.fastunet, name).default
    AUTOCAST_RULES[name] = target_dtype
    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):

        def kernel(*args, _device_type=device_type):
            dtype = target_dtype(args, _device_type)
            with torch.autocast(_device_type, enabled=False):
                return op(*cast_floating(args, _device_type, dtype))

        _AUTOCAST_LIB.impl(name, kernel, key)


def autocast_to_lower_precision(name: str) -> None:
    """Like F.conv2d under autocast: floating inputs run in the autocast dtype (fp16 or bf16)."""
    _register_autocast(name, _lower_precision)


def autocast_to_widest(name: str) -> None:
    """Like torch.cat under autocast: floating inputs are promoted to the widest of them."""
    _register_autocast(name, _widest_floating)
