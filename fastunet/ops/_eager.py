"""Calls of fastunet's ops past PyTorch's dispatcher, where nothing could tell the difference.

A torch.library.custom_op call goes from Python into the dispatcher and back out to Python,
once for the autograd kernel and again for the implementation, through argument checks and
default filling on each side. Measured on a 2-core x86 CPU (torch 2.13, 2026-12-07), a 3x3
conv2d_relu on a 1x8x8x8 input took 29 us as a plain function, 46 us as the custom op without
gradients and 71 us with them: on a GPU at small batch, that host time is as long as the
kernels, and a UNet step makes about 30 op calls forward and 50 backward.

`call(op, *args)` runs the op's own function directly when the call is plain eager PyTorch:
plain tensors (of class Tensor or Parameter; no subclass, fake tensor, fx proxy, lazy negation,
ZeroTensor or functionalization wrapper, which the dispatcher would resolve first) on the CPU or
a GPU, and no torch.compile, jit trace, functorch transform (vmap, grad, functionalize),
autograd's own vmap, dispatch mode (FlopCounterMode, FakeTensorMode, export's tracers) or
torch-function mode (which `torch.set_default_device` installs). Where autograd records (grad
mode on, an input that requires grad, autograd not excluded as in inference_mode) it runs under
an autograd.Function with the op's own setup_context and backward; under autocast it casts
first, by the op's own rule; under the profiler, the call is a range named like the op. In every
other case it calls the op through the dispatcher, as registered, so that whatever is watching
sees the op itself.

The callers pass arguments of the op's schema types: the dispatcher's conversions (a bool for
an int) and checks are not made here. The ops register their function, formula and autocast
rule once, through `custom_op`, `register_autograd` and `fastunet.ops._common`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastunet.ops._common import (
    AUTOCAST_RULES,
    cast_floating,
    in_functorch_transform,
    in_legacy_vmap,
    refuse_functorch_grad,
)

PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
DEVICE_TYPES = ("cpu", "cuda")
AUTOGRAD = torch._C.DispatchKey.AutogradFunctionality


@dataclass
class EagerOp:
    name: str
    function: Callable
    # Each parameter's default (inspect.Parameter.empty for a required one): the dispatcher
    # hands setup_context every argument, so a call here fills in those left out.
    defaults: tuple
    required: int
    autograd: type[torch.autograd.Function] | None = None


_EAGER: dict[object, EagerOp] = {}


def custom_op(name: str) -> Callable:
    """`torch.library.custom_op("fastunet::<name>", mutates_args=())`, whose function `call`
    can then run directly."""

    def register(function: Callable):
        op = torch.library.custom_op(f"fastunet::{name}", mutates_args=())(function)
        parameters = inspect.signature(function).parameters.values()
        if any(p.kind != p.POSITIONAL_OR_KEYWORD for p in parameters):
            raise TypeError(f"fastunet::{name}: `call` passes every argument by position")
        defaults = tuple(p.default for p in parameters)
        required = sum(d is inspect.Parameter.empty for d in defaults)
        _EAGER[op] = EagerOp(name, function, defaults, required)
        return op

    return register


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """`op.register_autograd(backward, setup_context=setup_context)`, and the same formula as
    an autograd.Function for `call`."""
    op.register_autograd(backward, setup_context=setup_context)
    eager = _EAGER[op]

    # With ctx as forward's first argument: a Function that defines setup_context instead binds
    # its arguments to forward's signature on every call, which costs more than the dispatcher.
    def forward(ctx, *args):
        output = eager.function(*args)
        setup_context(ctx, args, output)
        return output

    eager.autograd = type(
        f"Eager_{eager.name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def differentiate_by_composite(op, composite: Callable) -> None:
    """The autograd formula of an op that computes a gradient (an op of a backward formula):
    recompute its PyTorch composite from the saved inputs and differentiate that.

    Autograd records it only where a gradient is itself differentiated (create_graph=True, as
    a gradient penalty asks), so first-order training never saves or recomputes anything; the
    composite's own ops carry the higher orders."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.arguments = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))

    def backward(ctx, *grad_outputs):
        args = list(ctx.arguments)
        wanted = [i for i in ctx.tensor_positions if ctx.needs_input_grad[i]]
        with torch.enable_grad():
            for i, saved in zip(ctx.tensor_positions, ctx.saved_tensors, strict=True):
                # A new node for each input differentiated: its gradient is then this op's
                # own, not also the part through the other inputs' histories (a saved gradient
                # depends on x too), and the autograd graph before it is not run.
                args[i] = saved.view_as(saved) if i in wanted else saved
            outputs = composite(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # Gradients given for outputs that depend on the inputs (not the empty placeholders).
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs, strict=True)
                 if grad is not None and out.requires_grad]  # fmt: skip
        grads = [None] * len(args)
        if pairs and wanted:
            found = torch.autograd.grad(
                [out for out, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs],
                allow_unused=True, create_graph=torch.is_grad_enabled(),
            )  # fmt: skip
            for i, grad in zip(wanted, found, strict=True):
                grads[i] = grad
        return tuple(grads)

    register_autograd(op, backward, setup_context)


def _plain(t: Tensor) -> bool:
    return type(t) in PLAIN_TENSORS and not (
        t.is_neg() or torch._is_zerotensor(t) or torch._is_functional_tensor(t)
    )


def _plain_eager_device(args: tuple) -> str | None:
    """The device type of a plain eager call (see above), else None."""
    if (
        torch._C._has_torch_function(args)  # a torch-function mode or subclass
        or torch._C._len_torch_dispatch_stack()
        or torch.jit.is_tracing()
        or in_functorch_transform()
        or in_legacy_vmap()
        or not all(_plain(a) for a in args if isinstance(a, Tensor))
    ):
        return None
    device_type = args[0].device.type
    return device_type if device_type in DEVICE_TYPES else None


def call(op: Callable, *args):
    """`op(*args)`, without the dispatcher's round trips where the call is plain eager
    PyTorch; `op` may also be a plain function, which is simply called."""
    if torch.compiler.is_compiling():  # first: what follows is not for Dynamo to trace
        return op(*args)
    eager = _EAGER.get(op)
    if eager is None or len(args) < eager.required or not isinstance(args[0], Tensor):
        return op(*args)
    device_type = _plain_eager_device(args)
    if device_type is None:
        if in_functorch_transform():
            refuse_functorch_grad(eager.name, args)
        return op(*args)
    args += eager.defaults[len(args) :]
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function(f"fastunet::{eager.name}"):
            return _autocast_then_run(op, eager, args, device_type)
    return _autocast_then_run(op, eager, args, device_type)


def _autocast_then_run(op, eager: EagerOp, args: tuple, device_type: str):
    rule = AUTOCAST_RULES.get(eager.name)
    if rule is None or not torch.is_autocast_enabled(device_type):
        return _run(op, eager, args)
    # As the op's autocast kernel: cast, then run with autocast off. The casts are recorded by
    # autograd, so gradients reach the inputs in their own dtype.
    dtype = rule(args, device_type)
    with torch.autocast(device_type, enabled=False):
        return _run(op, eager, cast_floating(args, device_type, dtype))


def _run(op, eager: EagerOp, args: tuple):
    if not (
        torch.is_grad_enabled()
        and torch._C._any_requires_grad(*args)
        # As the dispatcher skips autograd where it is excluded: inference_mode, or inside an
        # op's own kernel (a user's custom op wrapping fastunet's layers).
        and not torch._C._dispatch_tls_is_dispatch_key_excluded(AUTOGRAD)
    ):
        return eager.function(*args)
    if eager.autograd is None:  # the dispatcher says what an op without a formula does
        return op(*args)
    return eager.autograd.apply(*args)
