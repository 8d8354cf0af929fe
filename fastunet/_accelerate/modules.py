"""What `accelerate` puts in place of torch.nn layers, and the functions its traced forwards call.

Every replacement computes what it replaces, keeps its parameter and buffer names, and runs the
fastunet op through the per-layer choice (`run_layer`), so a layer is never slower than PyTorch's.
Inputs the op does not take (not 4-D, not floating point, mixed dtypes) run PyTorch's path.
Inside the model's forward on the CPU (`RuleScopedForward`), where every layer runs PyTorch's
path by rule, the replacements run as the layers they replace were written.

A Sequential whose layers hold a Chain (conv [+ BatchNorm2d] [+ activation]) gets a
`ChainForward`, which computes the chain in one op. Only there: each layer called on its own
(the Sequential used as a container, `seq[0](x)`) runs as itself.

Outputs have the memory format the replaced layer's would have (the input's, as nn.Conv2d and
torch.cat give), though the ops compute channels_last: the PyTorch layers that run between
fastunet's then see what they see in the original model, so a dropout draws the same mask and a
training-mode BatchNorm sums in the same order. A model given channels_last input runs without
layout copies.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastunet import ops
from fastunet.nn import NotScriptable
from fastunet.ops._choice import (
    inside_pytorch_by_rule,
    pytorch_by_rule,
    record_rule_call,
    run_layer,
    runs_pytorch_by_rule,
)
from fastunet.ops._common import (
    CHANNELS_LAST,
    GLOBAL_HOOKS,
    conv_layout,
    has_hooks,
    in_memory_format,
    memory_format_of,
)


def observed(module: nn.Module) -> bool:
    """Whether a hook, the module's own or one for every module (registered at any time), would
    see its input or output: a fused op does not make them, so the layer then runs as itself.
    The hooks with which a traced forward records its layers' shapes do not count."""
    if (
        module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or any(GLOBAL_HOOKS)
    ):
        return True
    hooks = module._forward_hooks
    return bool(hooks) and any(
        not getattr(hook, "fastunet_records_shapes", False) for hook in hooks.values()
    )


def is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential (or a subclass) that runs nn.Sequential's own forward, without hooks.
    Not one with a ChainForward: a traced forward records its call as one layer's."""
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and "forward" not in vars(module)
        and not has_hooks(module)
    )


def run_order(sequential: nn.Sequential) -> list[nn.Module]:
    """The layers a plain Sequential runs, in order, through nested plain Sequentials."""
    layers = []
    for child in sequential._modules.values():
        layers += run_order(child) if is_plain_sequential(child) else [child]
    return layers


def batch_norm_folds(batch_norm: nn.BatchNorm2d) -> bool:
    """True when the BatchNorm2d is a fixed affine map now: eval mode with running statistics."""
    return not batch_norm.training and batch_norm.running_mean is not None


def fold_batch_norm(
    weight: Tensor, bias: Tensor | None, batch_norm: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """The convolution weight and bias that compute conv followed by the (eval) BatchNorm2d.

    Done at call time with differentiable ops, so the BN's own parameters get their gradients
    and its state_dict entries stay where they are."""
    # fp16 and bf16 in fp32: the folded weight and bias are then rounded once, as PyTorch's
    # conv output and BatchNorm output are, not at every step of the fold.
    dtype = weight.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def wide(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(compute)

    scale = torch.rsqrt(wide(batch_norm.running_var) + batch_norm.eps)
    if batch_norm.weight is not None:
        scale = scale * wide(batch_norm.weight)
    mean = wide(batch_norm.running_mean)
    shift = -mean if bias is None else wide(bias) - mean
    shift = shift * scale
    if batch_norm.bias is not None:
        shift = shift + wide(batch_norm.bias)
    return (wide(weight) * scale.reshape(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


def _activation(x: Tensor, negative_slope: float | None, in_place: bool = False) -> Tensor:
    if negative_slope is None:
        return x
    if negative_slope == 0:
        return F.relu(x, inplace=in_place)
    return F.leaky_relu(x, negative_slope, inplace=in_place)


def activation_slope(module: nn.Module) -> float | None:
    """The negative slope of a ReLU (0.0) or LeakyReLU that the op computes, else None."""
    if type(module) is nn.ReLU:
        return 0.0
    if type(module) is nn.LeakyReLU and module.negative_slope >= 0:
        return float(module.negative_slope)
    return None  # a negative slope cannot be undone from the output in the op's backward


@dataclass(eq=False)
class Chain:
    """What follows a convolution in a Sequential and is folded into its op: at most one
    BatchNorm2d, no-ops (Identity, Dropout) and a ReLU or LeakyReLU `activation`. `layers`: the
    FusedConv2d and every layer after it that the chain covers, in the Sequential's run order.
    The layers' attributes are read at each call (a LeakyReLU's slope, a BatchNorm's eps)."""

    batch_norm: nn.BatchNorm2d | None
    noops: tuple[nn.Module, ...]
    activation: nn.Module | None
    layers: tuple[nn.Module, ...] = ()

    @property
    def negative_slope(self) -> float | None:
        """The activation's slope now: None for none, 0.0 for ReLU."""
        return None if self.activation is None else activation_slope(self.activation)

    @property
    def activation_in_place(self) -> bool:
        return self.activation is not None and self.activation.inplace

    def folds_now(self) -> bool:
        """Whether the followers are a fixed function now, and nothing watches a layer's own
        output; else (BN in training, dropout active, a hook registered after `accelerate`)
        the convolution runs alone and they run themselves."""
        if self.batch_norm is not None and not batch_norm_folds(self.batch_norm):
            return False
        if self.activation is not None and self.negative_slope is None:
            return False  # a LeakyReLU whose slope was made negative runs as itself
        if any(observed(layer) for layer in self.layers):
            return False
        return all(
            not (isinstance(m, nn.Dropout | nn.Dropout2d) and m.training and m.p > 0)
            for m in self.noops
        )

    def activation_apart(self, x: Tensor) -> bool:
        """Whether the LeakyReLU (not in place) runs on its own, after the op: where autograd
        records the call. PyTorch's saves its input, the op its output, so a caller that changes
        the output in place (`out += identity`) would make the backward raise. Always inside
        torch.jit.trace, whose graph must not depend on the grad mode (its check traces again
        under no_grad) and may be trained."""
        if not self.negative_slope or self.activation_in_place:
            return False
        if torch.jit.is_tracing():
            return True
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(
            p.requires_grad for layer in self.layers for p in layer.parameters(recurse=False)
        )

    def describe(self) -> str:
        steps = ["conv2d"]
        if self.batch_norm is not None:  # without running statistics, never a fixed map
            folds = self.batch_norm.running_mean is not None
            how = "folded in eval" if folds else "batch statistics, runs apart"
            steps.append(f"batch_norm2d ({how})")
        steps += [type(m).__name__ for m in self.noops]
        if self.negative_slope == 0:
            steps.append("relu")
        elif self.negative_slope is not None:
            steps.append(f"leaky_relu({self.negative_slope:g})")
        return " + ".join(steps)


class FusedConv2d(NotScriptable, nn.Conv2d):
    """nn.Conv2d (stride 1, zero padding) on fastunet's conv op; a ChainForward computes the
    layers after it in the same op (`run`)."""

    @classmethod
    def adopt(cls, conv: nn.Conv2d) -> FusedConv2d:
        """conv itself, made a FusedConv2d by a change of its class, so it keeps whatever it
        holds (a mask buffer, a gain, a tag). A padding written "same" or "valid" becomes its
        amounts, which the op takes: the same convolution, as `swap.conv_support` lets "same"
        through with an odd square kernel only."""
        if conv.padding == "same":
            conv.padding = (conv.kernel_size[0] // 2,) * 2
        elif conv.padding == "valid":
            conv.padding = (0, 0)
        conv.__class__ = cls
        return conv

    def forward(self, x: Tensor) -> Tensor:
        if inside_pytorch_by_rule():  # as written
            return super().forward(x)
        return self.run(x, None, None)

    def run(
        self,
        x: Tensor,
        batch_norm: nn.BatchNorm2d | None,
        negative_slope: float | None,
        activation_in_place: bool = False,
    ) -> Tensor:
        """activation(batch_norm(conv(x))) in one op; batch_norm must fold (eval) or be None.
        `activation_in_place`: whether the activation as written changes the tensor in place
        (it then keeps the strides it is given, see `chain_layout`)."""
        weight, bias = self.weight, self.bias
        if batch_norm is not None and runs_pytorch_by_rule(x):
            # PyTorch's path on this device anyway: conv, BatchNorm and activation as written,
            # since folding on every call costs more on the CPU than the BatchNorm pass.
            relu = negative_slope is not None  # the op call's arguments, as run_layer gets them
            record_rule_call(
                "conv2d_relu", (x, weight, bias, self.padding[0], relu, negative_slope or 0.0)
            )
            out = F.conv2d(x, weight, bias, padding=self.padding)
            out = F.batch_norm(
                out, batch_norm.running_mean, batch_norm.running_var, batch_norm.weight,
                batch_norm.bias, training=False, eps=batch_norm.eps,
            )  # fmt: skip
            return _activation(out, negative_slope, activation_in_place)
        if batch_norm is not None:
            weight, bias = fold_batch_norm(weight, bias, batch_norm)
        if x.dim() != 4 or not x.is_floating_point():
            out = F.conv2d(x, weight, bias, padding=self.padding)
            return _activation(out, negative_slope, activation_in_place)
        out = run_layer(
            "conv2d_relu", ops.conv2d_relu, x, weight, bias, self.padding[0],
            negative_slope is not None, negative_slope or 0.0,
        )  # fmt: skip
        layout = chain_layout(
            x, weight, out, batch_norm is not None, negative_slope is not None, activation_in_place
        )
        return in_memory_format(out, layout)


# fastunet's ops return channels_last; a replaced layer hands on the layout that the PyTorch layer
# it replaces would have given.


def chain_layout(
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    batch_norm: bool,
    activation: bool,
    activation_in_place: bool,
) -> torch.memory_format:
    """The layout of the original's output for a replaced chain's output `out`: the
    convolution's (`conv_layout`), with that layout's own strides. Where both layouts fit `out`
    (a 1x1 image, one channel) the strides alone say which one the next layer reads, and a step
    after the convolution that makes a new tensor gives it NCHW strides: an activation not in
    place (as every elementwise op does there, on any device), and a BatchNorm2d on the CPU.
    (On CUDA, cuDNN's BatchNorm keeps its input's strides; PyTorch's own, for bf16, is not
    covered.)"""
    makes_a_tensor = (activation and not activation_in_place) or (batch_norm and not x.is_cuda)
    if makes_a_tensor and out.is_contiguous():  # the op's output is channels_last: both fit
        return torch.contiguous_format
    return conv_layout(x, weight)


def cat_layout(skip: Tensor, x: Tensor) -> torch.memory_format:
    """The layout of torch.cat([skip, interpolate(x)]): channels_last where both are
    (interpolate keeps x's)."""
    both = memory_format_of(skip) is CHANNELS_LAST and memory_format_of(x) is CHANNELS_LAST
    return CHANNELS_LAST if both else torch.contiguous_format


class ForwardStandIn:
    """Base of what `accelerate` puts in place of `module`'s forward (an instance attribute: class
    and state_dict stay). Its `__code__` is its `__call__`'s, as a function's would be:
    torch.export (non-strict, the default) reads the forward's code object. Its signature is the
    forward's as written, so what binds arguments by name (export's `dynamic_shapes`) sees it."""

    module: nn.Module

    @property
    def __code__(self) -> types.CodeType:
        return type(self).__call__.__code__

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.written_forward())

    def written_forward(self) -> Callable:
        """The module's forward as its class writes it, bound to the module."""
        return functools.partial(type(self.module).forward, self.module)


class ChainForward(ForwardStandIn):
    """Stands in for the forward of a plain Sequential whose layers hold Chains (`chains`, by
    their FusedConv2d; an instance attribute: class and state_dict stay): each chain runs as one
    op while this forward runs its layers in order and it folds. A layer called on its own (the
    Sequential used as a container) runs as itself, and so does a slice of the Sequential."""

    def __init__(self, sequential: nn.Sequential, chains: dict[nn.Module, Chain]):
        self.module, self.chains = sequential, chains

    def __call__(self, input):
        sequential, chains = self.module, self.chains
        # Global hooks would miss the nested Sequentials that the run order looks through.
        if inside_pytorch_by_rule() or any(GLOBAL_HOOKS):
            return type(sequential).forward(sequential, input)
        layers = run_order(sequential)
        i = 0
        while i < len(layers):
            chain = chains.get(layers[i])
            span = 0 if chain is None else len(chain.layers)
            # Its layers in the order they were found (modules compare by identity), folding now.
            if chain and tuple(layers[i : i + span]) == chain.layers and chain.folds_now():
                if chain.activation_apart(input):
                    input = layers[i].run(input, chain.batch_norm, None)
                    input = _activation(input, chain.negative_slope)
                else:
                    input = layers[i].run(
                        input, chain.batch_norm, chain.negative_slope, chain.activation_in_place
                    )
                i += span
            else:
                input = layers[i](input)
                i += 1
        return input


class AcceleratedMaxPool2d(NotScriptable, nn.MaxPool2d):
    """nn.MaxPool2d(2) on fastunet's max-pool op."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2d(x) if x.dim() == 4 else super().forward(x)


class RuleScopedForward(ForwardStandIn):
    """Stands in for the accelerated model's own forward (`forward`: the TracedForward put there,
    or None for its class's). Where the CPU rule sends every layer to PyTorch's path, the call
    runs inside `pytorch_by_rule()`, so the replaced layers run as written instead of each
    asking for its path."""

    def __init__(self, model: nn.Module, forward: Callable | None):
        self.module, self.forward = model, forward

    @property
    def __signature__(self) -> inspect.Signature:  # an instance forward's, where there was one
        return inspect.signature(self.forward) if self.forward else super().__signature__

    def __call__(self, *args, **kwargs):
        forward = self.forward or self.written_forward()
        if torch.compiler.is_compiling():  # each layer's own check goes into the graph
            return forward(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)  # the input, as a rule
        if not isinstance(x, Tensor) or not runs_pytorch_by_rule(x):
            return forward(*args, **kwargs)
        with pytorch_by_rule():
            return forward(*args, **kwargs)


# ---------------------------------------------------------------- called by traced forwards


def max_pool2d(x: Tensor) -> Tensor:
    """`F.max_pool2d(x, 2)` (an input the op does not take runs it as written: `run_layer`)."""
    return run_layer("max_pool2d", ops.max_pool2d, x)


def upsample_concat(
    x: Tensor, skip: Tensor, mode: str, align_corners: bool, skip_first: bool
) -> Tensor:
    """`cat([skip, up], 1)` (or `[up, skip]`) where up interpolates x to skip's height and
    width."""
    if x.dtype == skip.dtype and x.is_floating_point() and skip.dim() == 4:
        out = run_layer(
            "upsample_concat", ops.upsample_concat, x, skip, mode, align_corners, skip_first
        )
        return in_memory_format(out, cat_layout(skip, x))
    aligned = align_corners if mode == "bilinear" else None
    up = F.interpolate(x, size=skip.shape[-2:], mode=mode, align_corners=aligned)
    return torch.cat([skip, up] if skip_first else [up, skip], 1)


def conv_chain(
    x: Tensor,
    conv: FusedConv2d,
    batch_norm: nn.BatchNorm2d | None,
    negative_slope: float | None,
    activation_in_place: bool = False,
) -> Tensor:
    """activation(batch_norm(conv(x))) as a traced forward wrote it: one op while the
    BatchNorm2d folds (eval), else each step as itself."""
    if inside_pytorch_by_rule():
        out = conv(x)
        out = out if batch_norm is None else batch_norm(out)
        return _activation(out, negative_slope, activation_in_place)
    if batch_norm is None or batch_norm_folds(batch_norm):
        return conv.run(x, batch_norm, negative_slope, activation_in_place)
    return _activation(batch_norm(conv(x)), negative_slope, activation_in_place)
