"""accelerate's module swaps, decided once from the module tree: Conv2d chains in Sequentials,
and Conv2d and MaxPool2d wherever they are.

A Sequential's forward is known (each layer feeds the next), so a run of layers in one, nested
Sequentials flattened, can be fused without tracing any code: the Conv2d becomes a FusedConv2d,
and the Sequential's forward a ChainForward, which computes the conv and the chain after it in
one op (the BatchNorm2d and activation stay as they are, and run themselves when called on
their own). Nothing moves in the module tree, so the state_dict keys stay.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from fastunet._accelerate.modules import (
    AcceleratedMaxPool2d,
    Chain,
    ChainForward,
    FusedConv2d,
    activation_slope,
    is_plain_sequential,
)
from fastunet._accelerate.report import LEFT, AccelerationReport
from fastunet.ops._common import has_hooks

CONV_OP, POOL_OP = "fastunet::conv2d_relu", "fastunet::max_pool2d"
NOOPS = (nn.Identity, nn.Dropout, nn.Dropout2d)


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def conv_support(conv: nn.Module) -> str:
    """Why fastunet's conv op does not compute this layer as a FusedConv2d, or "" when it does."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__}: only nn.Conv2d has a fastunet op"
    if nn.utils.parametrize.is_parametrized(conv):  # before the subclass check: it is one
        return "its weight is parametrized"
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} subclasses nn.Conv2d: its forward may differ"
    if "forward" in vars(conv):
        return "its forward is set on the instance"
    if conv.stride != (1, 1):
        return f"stride {conv.stride}: the op is stride 1"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}: the op is dilation 1"
    if conv.groups != 1:
        return f"groups={conv.groups}: the op is groups 1"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the op pads with zeros"
    if has_hooks(conv):
        return "it has hooks"
    padding, (kh, kw) = conv.padding, conv.kernel_size
    if padding == "same" and not (kh % 2 == 1 and kh == kw):
        return f"padding='same' with kernel {conv.kernel_size} is not one symmetric amount"
    if padding not in ("same", "valid") and padding[0] != padding[1]:
        return f"padding {padding}: the op pads H and W alike"
    return ""


def pool_support(pool: nn.MaxPool2d) -> str:
    """Why fastunet's max-pool does not compute this nn.MaxPool2d, or "" when it does."""
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} subclasses nn.MaxPool2d: its forward may differ"
    pairs = {
        "kernel_size": (pool.kernel_size, 2),
        "stride": (pool.stride, 2),
        "padding": (pool.padding, 0),
        "dilation": (pool.dilation, 1),
    }
    for name, (value, wanted) in pairs.items():
        if value not in (wanted, (wanted, wanted)):
            return f"{name}={value}: the op is kernel 2, stride 2, no padding, dilation 1"
    if pool.ceil_mode or pool.return_indices:
        return "ceil_mode or return_indices: the op is floor mode without indices"
    if has_hooks(pool):
        return "it has hooks"
    return ""


@dataclass
class Slot:
    parent: nn.Module
    name: str
    path: str

    @property
    def module(self) -> nn.Module:
        return self.parent._modules[self.name]


def _flatten(sequential: nn.Sequential, path: str) -> list[Slot]:
    """The layers a plain Sequential runs in order, through nested plain Sequentials."""
    slots = []
    for name, child in sequential._modules.items():
        if is_plain_sequential(child):
            slots += _flatten(child, join(path, name))
        else:
            slots.append(Slot(sequential, name, join(path, name)))
    return slots


def _chain_after(slots: list[Slot], i: int, conv: nn.Conv2d, uses: Counter):
    """The Chain after the Conv2d at slots[i], the index of its last layer, and the layer that
    ended it (None when the run ended)."""
    batch_norm, noops, pending, last = None, [], [], i
    for j in range(i + 1, len(slots)):
        module = slots[j].module
        if uses[id(module)] > 1 or has_hooks(module):
            return _make_chain(batch_norm, noops, None), last, module
        if type(module) in NOOPS:
            pending.append(module)
            continue
        if (
            type(module) is nn.BatchNorm2d
            and batch_norm is None
            and module.num_features == conv.out_channels
        ):
            batch_norm, noops, pending, last = module, noops + pending, [], j
            continue
        if activation_slope(module) is not None:
            return _make_chain(batch_norm, noops + pending, module), j, None
        return _make_chain(batch_norm, noops, None), last, module
    return _make_chain(batch_norm, noops, None), last, None


def _make_chain(batch_norm, noops, activation) -> Chain | None:
    if batch_norm is None and activation is None:
        return None
    return Chain(batch_norm, tuple(noops), activation)


def _stop_note(module: nn.Module | None) -> str:
    """Why the layer after a convolution is not folded into it, when it is a norm or an
    activation (the layers a user would expect to be)."""
    if module is None:
        return ""
    name = type(module).__name__
    is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
    is_activation = type(module).__module__ == "torch.nn.modules.activation"
    if not (is_norm or is_activation):
        return ""
    if type(module) is nn.LeakyReLU and module.negative_slope < 0:
        return f"the {name} after it has a negative slope and runs as itself"
    if type(module) in (nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU):
        return f"the {name} after it is shared, hooked or repeated, and runs as itself"
    return f"the {name} after it runs as itself (only BatchNorm2d and ReLU/LeakyReLU fold)"


def _fuse_run(slots: list[Slot], uses: Counter, notes: dict, report: AccelerationReport):
    """The chains of one plain Sequential's run of layers, by their FusedConv2d."""
    chains = {}
    i = 0
    while i < len(slots):
        slot = slots[i]
        conv = slot.module
        if conv_support(conv) or uses[id(conv)] > 1:
            i += 1
            continue
        chain, last, stopped_at = _chain_after(slots, i, conv, uses)
        if chain is None:
            notes[id(conv)] = _stop_note(stopped_at)
            i += 1
            continue
        FusedConv2d.adopt(conv)
        chain.layers = (conv, *(slots[j].module for j in range(i + 1, last + 1)))
        chains[conv] = chain
        why = "folds while the BatchNorm2d is in eval mode" if chain.batch_norm else ""
        if any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in chain.noops):
            why = (why + "; " if why else "") + "folds while dropout is off"
        report.add(slot.path, chain.describe(), CONV_OP, why or _stop_note(stopped_at))
        i = last + 1
    return chains


def _fuse_sequentials(module: nn.Module, path: str, uses, notes, report, seen: set) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    if is_plain_sequential(module):
        slots = _flatten(module, path)
        chains = _fuse_run(slots, uses, notes, report)
        if chains:
            module.forward = ChainForward(module, chains)
        children = [(slot.module, slot.path) for slot in slots]
    else:
        children = [(child, join(path, name)) for name, child in module.named_children()]
    for child, child_path in children:
        _fuse_sequentials(child, child_path, uses, notes, report, seen)


def swap_modules(model: nn.Module, report: AccelerationReport) -> None:
    """Fuse the chains of every plain Sequential, then make the remaining Conv2d and MaxPool2d
    layers FusedConv2d and AcceleratedMaxPool2d: a change of class, so each keeps what it holds
    and stays wherever it is used."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    notes: dict[int, str] = {}
    _fuse_sequentials(model, "", uses, notes, report, set())
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, FusedConv2d):
            why = conv_support(module)
            if why:
                report.add(path, type(module).__name__, LEFT, why)
                continue
            FusedConv2d.adopt(module)
            report.add(path, "conv2d", CONV_OP, notes.get(id(module), ""))
        elif isinstance(module, nn.MaxPool2d):
            why = pool_support(module)
            if why:
                report.add(path, type(module).__name__, LEFT, why)
                continue
            module.__class__ = AcceleratedMaxPool2d
            report.add(path, "max_pool2d(2)", POOL_OP)
