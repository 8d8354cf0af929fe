"""accelerate's traced forwards: the UNet patterns in a module's own forward code.

A decoder block's upsample + pad + cat is written in Python, often with branches on tensor
shapes (MONAI's UpCat pads only where sizes differ) or on optional arguments (a last block
without a skip). torch.fx traces such code wrongly or not at all: a shape comparison on a Proxy
raises, and `isinstance(proxy, torch.Tensor)` is False, so fx silently takes MONAI's no-skip
branch. So the forward is traced per call signature (input shapes, dtypes, devices, which
arguments are None, the scalar arguments, training, grad and autocast mode, the module's scalar
attributes that its code reads), right after the first call with that signature has run as
written:

- that call records the output shape of each layer it calls (forward hooks);
- fx then traces the forward with those shapes concrete: `x.shape`, `x.size()`, `x.dim()` (and
  for inputs, layers' outputs and parameters `x.dtype` and `x.device`) are values and
  `isinstance(x, torch.Tensor)` is True, so Python branches go the way the real call went; tensor
  values stay symbolic, so a branch on a value fails the trace, and that signature keeps running
  the forward as written;
- the graph's patterns are rewritten onto fastunet's ops and the code is generated once; later
  calls with the signature run it, bound to the live module (so `.to()`, `load_state_dict` and
  train/eval apply), while the layers whose calls it put on ops are still in place (a replaced
  one makes the signature trace again).

Under torch.compile nothing is traced: a signature already seen runs its generated code (dynamo
inlines it), any other runs the forward as written.
"""

from __future__ import annotations

import builtins
import contextlib
import dis
import functools
import inspect
import operator
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastunet._accelerate.modules import (
    ForwardStandIn,
    FusedConv2d,
    conv_chain,
    is_plain_sequential,
    max_pool2d,
    observed,
    upsample_concat,
)
from fastunet._accelerate.report import LEFT, AccelerationReport
from fastunet._accelerate.swap import CONV_OP, POOL_OP, join
from fastunet.ops._choice import inside_pytorch_by_rule, symbolic
from fastunet.ops._common import has_hooks

UPSAMPLE_OP = "fastunet::upsample_concat"
# A forward is traced only if its code names one of these (by attribute or global name).
PATTERN_NAMES = frozenset(
    {"cat", "concat", "concatenate", "max_pool2d", "relu", "relu_", "leaky_relu", "leaky_relu_"}
)
# Traced signatures per module; calls with further ones run the forward as written.
MAX_SIGNATURES = 16
# node.meta keys: the node's value on the meta device (for its shape), and the device of a
# tensor the real call had (an input, a layer's output, an attribute), whose dtype is then real
# too; a torch function's result on the meta device may not have the real dtype (autocast).
META, DEVICE = "fastunet_meta", "fastunet_device"


class _Missing:
    """A node's value that could not be computed on the meta device."""


MISSING = _Missing()


# ---------------------------------------------------------------- which forwards, which calls


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """The code and the code nested in it (lambdas, comprehensions, inner functions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _code_names(code: types.CodeType) -> set[str]:
    return {name for nested in _codes(code) for name in nested.co_names}


# Forwards never traced: torch's layers, and fastunet's own (already on the ops).
OWN_MODULES = ("torch.", "fastunet.nn", "fastunet._accelerate")


def wants_trace(module: nn.Module) -> bool:
    """A forward of the user's that may hold a pattern."""
    cls = type(module)
    if cls.__module__.startswith(OWN_MODULES) or is_plain_sequential(module):
        return False
    code = getattr(cls.forward, "__code__", None)
    return (
        code is not None
        and "forward" not in vars(module)
        and bool(_code_names(code) & PATTERN_NAMES)
    )


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def branch_attributes(module: nn.Module) -> tuple[str, ...]:
    """The attributes of the module whose values every call's key holds, since its forward may
    branch on them (`self.use_skip`, `self.deep_supervision`): those whose values (on the
    instance, or on its class) are None, bool, int, float or str and whose names its code reads,
    or the code of the methods and properties of its class that it names (a helper may read
    them). Not `training`, which every key holds, nor one the code sets (`self.calls += 1`: the
    trace refuses that forward)."""
    cls = type(module)
    read, written, pending = set(), set(), [cls.forward]
    while pending:
        for code in _codes(pending.pop().__code__):
            written.update(
                instruction.argval
                for instruction in dis.get_instructions(code)
                if instruction.opname in ("STORE_ATTR", "DELETE_ATTR")
            )
            for name in set(code.co_names) - read:
                read.add(name)
                owner = next((c for c in cls.__mro__ if name in vars(c)), None)
                if owner is None or owner.__module__.startswith(OWN_MODULES):
                    continue
                member = vars(owner)[name]
                member = member.fget if isinstance(member, property) else member
                member = getattr(member, "__func__", member)  # a staticmethod or classmethod
                if hasattr(member, "__code__"):
                    pending.append(member)
    names = read - written - {"training"}
    return tuple(
        sorted(name for name in names if _is_scalar(inspect.getattr_static(module, name, MISSING)))
    )


_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Signature:
    """A forward's parameters after self: names and defaults, to bind a call without inspect
    (which torch.compile does not trace)."""

    names: tuple[str, ...]
    defaults: tuple

    @classmethod
    def of(cls, forward: Callable) -> Signature | None:
        """None when the forward takes *args, **kwargs or keyword-only arguments."""
        parameters = list(inspect.signature(forward).parameters.values())[1:]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if any(p.kind not in positional for p in parameters):
            return None
        return cls(tuple(p.name for p in parameters), tuple(p.default for p in parameters))

    def bind(self, args: tuple, kwargs: dict) -> tuple | None:
        """The argument values in parameter order, or None if the call does not fit."""
        if len(args) > len(self.names):
            return None
        values, used = list(args), 0
        rest = zip(self.names[len(args) :], self.defaults[len(args) :], strict=True)
        for name, default in rest:
            if name in kwargs:
                values.append(kwargs[name])
                used += 1
            elif default is _REQUIRED:
                return None
            else:
                values.append(default)
        return tuple(values) if used == len(kwargs) else None


def call_key(module: nn.Module, values: tuple, attributes: tuple[str, ...] = ()) -> tuple | None:
    """What a traced graph depends on besides the module's configuration: the modes, the
    arguments and the `branch_attributes` named. None for arguments other than tensors, None and
    scalars, or such an attribute no longer None or a scalar (such a call runs the forward as
    written)."""
    key = [
        module.training,
        torch.is_grad_enabled(),
        *(torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None
          for d in ("cpu", "cuda")),
    ]  # fmt: skip
    for value in values:
        if isinstance(value, Tensor):
            key.append((value.shape, value.dtype, value.device))
        elif _is_scalar(value):
            key.append(value)
        else:
            return None
    for name in attributes:
        value = getattr(module, name, None)
        if not _is_scalar(value):
            return None
        key.append(value)
    return tuple(key)


def traced_for(key: tuple, traced: dict[tuple, object], symbols: bool):
    """traced[key], or None. With `symbols` (torch.compile, torch.export, make_fx's symbolic
    tracing) the key's sizes may be symbolic (a dynamic dimension): one known only as a symbol
    equals no traced size, and the comparison adds no guard, so the dimension stays dynamic (a
    dict lookup would have specialized it, and export refuses that; non-strict export and
    make_fx cannot hash it at all)."""
    if not symbols:
        return traced.get(key)
    for traced_key, found in traced.items():
        if len(traced_key) == len(key) and all(map(_same_key_part, key, traced_key)):
            return found
    return None


def _same_key_part(part, traced_part) -> bool:
    if isinstance(part, tuple) and isinstance(traced_part, tuple):  # (shape, dtype, device)
        (shape, *rest), (traced_shape, *traced_rest) = part, traced_part
        return (
            len(shape) == len(traced_shape)
            and all(statically_known_true(a == b) for a, b in zip(shape, traced_shape, strict=True))
            and rest == traced_rest
        )
    return statically_known_true(part == traced_part)  # a scalar argument may be symbolic too


# ---------------------------------------------------------------- tracing with concrete shapes


def _to_meta(value):
    if isinstance(value, Tensor):
        return torch.empty_like(value, device="meta")
    if hasattr(value, "_fields"):  # a namedtuple takes its fields one by one
        return type(value)(*map(_to_meta, value))
    if isinstance(value, tuple | list):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def trace_leaves(module: nn.Module) -> list[nn.Module]:
    """The modules a trace of module's forward records as calls: its children, with plain
    Sequentials, ModuleLists and ModuleDicts looked through."""
    leaves: dict[int, nn.Module] = {}
    for child in module.children():
        if is_plain_sequential(child) or isinstance(child, nn.ModuleList | nn.ModuleDict):
            leaves.update((id(m), m) for m in trace_leaves(child))
        else:
            leaves[id(child)] = child
    return list(leaves.values())


AUGMENTED_ASSIGNMENTS = (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul,
)  # fmt: skip


class _ShapedProxy(fx.Proxy):
    """A Proxy that answers shape questions with the shape the real call had."""

    # isinstance(x, nn.Parameter) and nn.Buffer read these from anything that is a Tensor.
    _is_param = _is_buffer = False

    def _refuse(self, what: str):
        """Fails the trace, and marks it failed: user code may catch the error and go on."""
        self.tracer.refused = f"it {what}, which the traced code would not"
        raise fx.proxy.TraceError(self.tracer.refused)

    def _value(self, *args):
        self._refuse("reads a tensor's value into Python")

    __bool__ = __int__ = __float__ = __index__ = __complex__ = _value

    def _meta_tensor(self) -> Tensor:
        value = self.node.meta.get(META, MISSING)
        if not isinstance(value, Tensor):
            raise fx.proxy.TraceError(f"the shape of {self.node.name} is not known")
        return value

    @property
    def shape(self) -> torch.Size:
        return self._meta_tensor().shape

    @property
    def ndim(self) -> int:
        return self._meta_tensor().ndim

    def size(self, dim: int | None = None):
        return self._meta_tensor().size() if dim is None else self._meta_tensor().size(dim)

    def dim(self) -> int:
        return self._meta_tensor().dim()

    def numel(self) -> int:
        return self._meta_tensor().numel()

    def __len__(self) -> int:
        return len(self._meta_tensor())

    def _real(self) -> Tensor | None:
        """The meta tensor when its dtype is the real call's; its device is node.meta[DEVICE]."""
        return self._meta_tensor() if DEVICE in self.node.meta else None

    @property
    def dtype(self):
        real = self._real()
        return fx.Proxy.__getattr__(self, "dtype") if real is None else real.dtype

    @property
    def device(self):
        real = self._real()
        return fx.Proxy.__getattr__(self, "device") if real is None else self.node.meta[DEVICE]

    @property
    def is_cuda(self):
        real = self._real()
        return fx.Proxy.__getattr__(self, "is_cuda") if real is None else self.device.type == "cuda"

    def is_floating_point(self):
        real = self._real()
        if real is None:
            return fx.Proxy.__getattr__(self, "is_floating_point")()
        return real.is_floating_point()


def _recorded(operation: Callable):
    def update(self, other):
        return self.tracer.create_proxy("call_function", operation, (self, other), {})

    return update


# `x += y` is recorded as operator.iadd, which the generated code runs in place, as written.
# Without these Python runs `x = x + y`: the same for a residual block's `out += identity`, but
# an argument or a view updated so would no longer change the caller's tensor.
for _operation in AUGMENTED_ASSIGNMENTS:
    setattr(_ShapedProxy, f"__{_operation.__name__}__", _recorded(_operation))


def _submodule(root: nn.Module, target: str) -> nn.Module:
    """root.get_submodule(target) without getattr, which fx patches while it traces."""
    return functools.reduce(lambda m, name: m._modules[name], filter(None, target.split(".")), root)


def _device(value) -> torch.device | None:
    return value.device if isinstance(value, Tensor) else None


def _holds(value, test: Callable[[object], bool]) -> bool:
    """Whether a leaf of value (nested tuples, lists, dicts) passes test."""
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if test(v) else v)
    return bool(found)


def _modes() -> tuple:
    """The global modes a forward may change inside, which fx does not record."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")),
    )


_isinstance = builtins.isinstance
# The guards patch the process: two traces at once in two threads would undo each other's.
_ONE_TRACE_AT_A_TIME = threading.Lock()


def _traced_isinstance(obj, classinfo) -> bool:
    """isinstance, for which a traced value of the real call's tensor is a torch.Tensor: the
    forward's Python takes the branches the real call took (MONAI's UpCat checks
    `torch.jit.isinstance(x, torch.Tensor)`). C++ does not call it, so it never takes a traced
    value for a tensor (which crashes the process); fx's own checks for a Proxy still see one."""
    if type(obj) is _ShapedProxy and _isinstance(obj.node.meta.get(META), Tensor):
        return _isinstance(obj, classinfo) or issubclass(Tensor, classinfo)
    return _isinstance(obj, classinfo)


@contextlib.contextmanager
def _builtin_isinstance() -> Iterator[None]:
    """The builtin isinstance again, for torch's own code run on meta values while tracing: a
    module it imports lazily keeps what it finds (torch._dynamo, imported by the first meta
    computation, keeps isinstance in its tables, and torch.compile then fails on isinstance
    for the rest of the process)."""
    patched = builtins.isinstance
    builtins.isinstance = _isinstance
    try:
        yield
    finally:
        builtins.isinstance = patched


@contextlib.contextmanager
def _tracing_guards() -> Iterator[None]:
    """While tracing: isinstance as `_traced_isinstance`; and a custom autograd.Function or an
    activation checkpoint called on a traced value fails the trace (they would run it as a
    tensor, or drop the checkpoint)."""
    function_apply = vars(torch.autograd.Function)["apply"]
    checkpointed = torch.utils.checkpoint._checkpoint_without_reentrant_generator

    def refuse(name, call):
        def guarded(*args, **kwargs):
            if _holds((args, kwargs), lambda v: type(v) is _ShapedProxy):
                raise fx.proxy.TraceError(f"it calls {name}, which a trace cannot follow")
            return call(*args, **kwargs)

        return guarded

    apply = refuse("a custom autograd.Function", function_apply.__func__)
    torch.autograd.Function.apply = classmethod(apply)
    torch.utils.checkpoint._checkpoint_without_reentrant_generator = refuse(
        "torch.utils.checkpoint", checkpointed
    )
    builtins.isinstance = _traced_isinstance
    try:
        yield
    finally:
        builtins.isinstance = _isinstance
        torch.autograd.Function.apply = function_apply
        torch.utils.checkpoint._checkpoint_without_reentrant_generator = checkpointed


def _random_states(cuda_devices: list[int]) -> list[Tensor]:
    return [torch.random.get_rng_state(), *map(torch.cuda.get_rng_state, cuda_devices)]


def _version(tensor: Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor: it cannot be changed in place outside one
        return None


class _ModuleState:
    """The attributes of a module and its submodules, and the values of their tensors: whether
    tracing its forward changed any (a counter, a tensor kept for later, fx's constants for
    tensors made at trace time, a buffer updated in place), and putting them back (a parameter
    updated in place stays so). Taken after the real call, so what that call set stays."""

    def __init__(self, module: nn.Module):
        self.saved = [
            (path, m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for path, m in module.named_modules()
        ]
        self.tensors = []  # (name, tensor, version, a copy of its values unless a parameter)
        for path, _, attributes, parameters, buffers, _ in self.saved:
            for name, t in {**attributes, **buffers, **parameters}.items():
                if isinstance(t, Tensor) and _version(t) is not None:
                    copy = None if name in parameters else t.detach().clone()
                    self.tensors.append((join(path, name), t, t._version, copy))

    def changed(self) -> list[str]:
        names = [name for name, t, version, _ in self.tensors if t._version != version]
        for path, m, *saved in self.saved:
            for before, now in zip(saved, (vars(m), m._parameters, m._buffers, m._modules),
                                   strict=True):  # fmt: skip
                names += [join(path, k) for k in before.keys() | now.keys()
                          if before.get(k, MISSING) is not now.get(k, MISSING)]  # fmt: skip
        return sorted(set(names))

    def restore(self) -> None:
        for _, m, attributes, parameters, buffers, modules in self.saved:
            vars(m).clear()
            vars(m).update(attributes)
            for now, before in zip((m._parameters, m._buffers, m._modules),
                                   (parameters, buffers, modules), strict=True):  # fmt: skip
                now.clear()
                now.update(before)
        with torch.no_grad():
            for _, t, version, copy in self.tensors:
                if copy is not None and t._version != version:
                    t.copy_(copy)


class _ShapeTracer(fx.Tracer):
    """fx's tracer, with each node's value computed on the meta device as it is recorded:
    layers' outputs come from the recorded real call, torch functions run on meta tensors."""

    def __init__(self, values: tuple, records: list):
        super().__init__(param_shapes_constant=True)
        self.values, self.records = list(values), list(records)
        self.modes = _modes()
        self.refused: str | None = None  # why, once a value was read or updated in place
        # fx patches Module.__call__ and __getattr__ for the whole process while it traces.
        self.thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not is_plain_sequential(m)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        if threading.get_ident() != self.thread:  # a model run in another thread meanwhile
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_arg(self, a):
        # Before fx's own isinstance(a, torch.Tensor) check, which a _ShapedProxy passes.
        return a.node if type(a) is _ShapedProxy else super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        if _modes() != self.modes:
            raise fx.proxy.TraceError(
                "it changes grad mode or autocast inside (`with torch.no_grad()`...), which the "
                "traced code would not"
            )
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        node = proxy.node
        real = self._real_value(node)
        if real is None:
            node.meta[META] = self._meta_value(node)
        else:
            node.meta[META], device = real
            if device is not None:
                node.meta[DEVICE] = device
        return proxy

    def _real_value(self, node: fx.Node) -> tuple | None:
        """(meta value, device or None) of what the real call had at this node, for inputs,
        layers' outputs (as recorded) and attributes; None for other nodes."""
        if node.op == "placeholder":
            value = self.values.pop(0)
            return _to_meta(value), _device(value)
        if node.op == "call_module":
            layer = _submodule(self.root, node.target)
            if not self.records or self.records[0][0] is not layer:
                raise fx.proxy.TraceError(f"{node.target} is not the layer the call ran next")
            return self.records.pop(0)[1:]
        if node.op == "get_attr":
            *path, name = node.target.split(".")
            owner = _submodule(self.root, ".".join(path))
            value = {**vars(owner), **owner._buffers, **owner._parameters}[name]
            return _to_meta(value), _device(value)
        return None

    def _meta_value(self, node: fx.Node):
        """A torch function's result, computed on the meta values of its arguments."""
        args, kwargs = fx.node.map_arg(
            (node.args, node.kwargs), lambda n: n.meta.get(META, MISSING)
        )
        if _holds((args, kwargs), lambda v: v is MISSING):
            return MISSING
        try:
            with _builtin_isinstance():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                return getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:  # an op the meta device does not run: its shape stays unknown
            return MISSING


# ---------------------------------------------------------------- the rewrites


def _meta(node) -> Tensor | None:
    value = node.meta.get(META) if isinstance(node, fx.Node) else None
    return value if isinstance(value, Tensor) else None


def _is_4d(node) -> bool:
    value = _meta(node)
    return value is not None and value.dim() == 4


def _arguments(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict | None:
    """node's arguments by name; None when they do not fit `names`."""
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    bound = {**defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs}
    return bound if set(names) <= set(bound) else None


def _is(value, wanted) -> bool:
    """value is `wanted` or a pair of it (a kernel size, stride, scale...)."""
    if isinstance(value, tuple | list):
        return len(value) == 2 and all(v == wanted for v in value)
    return value == wanted


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


INTERPOLATE_PARAMS = tuple(inspect.signature(F.interpolate).parameters)
INTERPOLATE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(F.interpolate).parameters.items()
    if p.default is not _REQUIRED
}


@dataclass
class _Upsample:
    x: fx.Node
    mode: str
    align_corners: bool
    nodes: list[fx.Node]  # the upsample and pad nodes the fused op replaces

    def describe(self) -> str:
        corners = ", align_corners" if self.align_corners else ""
        return f"upsample({self.mode}{corners})" + (" + pad" if len(self.nodes) > 1 else "")


def _upsample_settings(node: fx.Node, root: nn.Module) -> dict | None:
    """The interpolate arguments of an nn.Upsample or F.interpolate node, else None."""
    if node.op == "call_module":
        layer = root.get_submodule(node.target)
        if type(layer) is not nn.Upsample or has_hooks(layer) or len(node.args) != 1:
            return None
        settings = {name: getattr(layer, name) for name in INTERPOLATE_PARAMS[1:-1]}
        return {"input": node.args[0], **settings, "antialias": False}
    if node.op == "call_function" and node.target is F.interpolate:
        return _arguments(node, INTERPOLATE_PARAMS, INTERPOLATE_DEFAULTS)
    return None


def _upsample_source(node: fx.Node, root: nn.Module) -> tuple[_Upsample | None, str]:
    """The upsample that `node` is (through a pad of zero amounts), or None and why not ("" when
    node is no upsample at all)."""
    nodes = [node]
    pad = None
    if node.op == "call_function" and node.target is F.pad:
        pad = _arguments(node, ("input", "pad", "mode", "value"), {"mode": "constant"})
        if pad is None or not isinstance(pad["input"], fx.Node):
            return None, ""
        node = pad["input"]
        nodes.insert(0, node)
    settings = _upsample_settings(node, root)
    if settings is None:
        return None, ""
    if pad is not None and not all(isinstance(p, int) and p == 0 for p in pad["pad"]):
        return None, f"the pad amounts {pad['pad']} are not zero for these sizes"
    if any(len(n.users) != 1 for n in nodes):
        return None, "the upsampled tensor is used elsewhere too"
    mode = settings["mode"]
    if mode not in ("nearest", "bilinear") or settings["antialias"]:
        return None, f"mode {mode!r}: the op upsamples nearest or bilinear"
    if settings["size"] is None and not _is(settings["scale_factor"], 2):
        return None, f"scale_factor {settings['scale_factor']}: the op upsamples 2x or to a size"
    if not _is_4d(settings["input"]):
        return None, "the input is not 4-D"
    aligned = mode == "bilinear" and bool(settings["align_corners"])
    return _Upsample(settings["input"], mode, aligned, nodes), ""


CATS = (torch.cat, torch.concat, torch.concatenate)


def _mutates(node: fx.Node) -> bool:
    """Whether a node may change a tensor in place: a method or function whose name ends in an
    underscore (x.mul_, torch.relu_), inplace=True, item or augmented assignment (x += y), or a
    layer's call (an nn.ReLU(inplace=True), or a user's)."""
    if node.op == "call_module":
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in AUGMENTED_ASSIGNMENTS:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__")
    return in_place or name == "setitem" or node.kwargs.get("inplace") is True


def _changes_in_place_after(node: fx.Node, root: nn.Module) -> bool:
    """Whether a node after this one may change a tensor in place (out += identity, x.mul_(2), an
    nn.LeakyReLU(inplace=True)): any, as the tensor changed may be a view of node's value."""
    later = node.next
    while later.op != "output":
        if later.op == "call_module":
            if getattr(root.get_submodule(later.target), "inplace", False) is True:
                return True
        elif _mutates(later):
            return True
        later = later.next
    return False


def _changed_in_between(first: fx.Node, last: fx.Node, own: set) -> bool:
    """Whether a node after first and before last, other than the pattern's own, may change a
    tensor in place: the fused op, which runs where last was, would read the changed one."""
    node = first.next
    while node is not last:
        if node not in own and _mutates(node):
            return True
        node = node.next
    return False


IN_BETWEEN = "a tensor may change in place between its parts"


def _rewrite_cat(graph: fx.Graph, cat: fx.Node, root: nn.Module, rows: list) -> None:
    args = _arguments(cat, ("tensors", "dim"), {"dim": 0})
    if args is None and cat.target is torch.concatenate:
        args = _arguments(cat, ("tensors", "axis"), {"axis": 0})
        args = args and {"tensors": args["tensors"], "dim": args["axis"]}
    if args is None or not _is_4d(cat) or args["dim"] % 4 != 1:
        return
    tensors = args["tensors"]
    if not (isinstance(tensors, list | tuple) and len(tensors) == 2):
        return
    if not all(isinstance(t, fx.Node) for t in tensors):
        return
    for up_index in (1, 0):  # [skip, up] first: both may be upsampled
        source, why = _upsample_source(tensors[up_index], root)
        skip = tensors[1 - up_index]
        order = "cat([skip, up])" if up_index == 1 else "cat([up, skip])"
        if source is None:
            if why:
                rows.append((f"upsample + {order}", LEFT, why))
            continue
        if _changed_in_between(source.nodes[0], cat, {*source.nodes}):
            rows.append((f"{source.describe()} + {order}", LEFT, IN_BETWEEN))
            return
        with graph.inserting_before(cat):
            fused = graph.call_function(
                upsample_concat,
                (source.x, skip, source.mode, source.align_corners, up_index == 1),
            )
        fused.meta[META] = cat.meta[META]
        cat.replace_all_uses_with(fused)
        for node in [cat, *reversed(source.nodes)]:
            graph.erase_node(node)
        rows.append((f"{source.describe()} + {order}", UPSAMPLE_OP, ""))
        return


MAX_POOL_PARAMS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
MAX_POOL_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "dilation": 1,
    "ceil_mode": False,
    "return_indices": False,
}
MAX_POOLS = (F.max_pool2d, torch.max_pool2d)


def _rewrite_max_pool(graph: fx.Graph, node: fx.Node, rows: list) -> None:
    args = _arguments(node, MAX_POOL_PARAMS, MAX_POOL_DEFAULTS)
    if args is None or args["return_indices"] or not _is_4d(args["input"]):
        return
    stride = args["stride"]
    if not (
        _is(args["kernel_size"], 2)
        and (stride is None or stride in ((), []) or _is(stride, 2))
        and _is(args["padding"], 0)
        and _is(args["dilation"], 1)
        and not args["ceil_mode"]
    ):
        rows.append(("max_pool2d", LEFT, "the op is kernel 2, stride 2, no padding, floor mode"))
        return
    with graph.inserting_before(node):
        fused = graph.call_function(max_pool2d, (args["input"],))
    fused.meta[META] = node.meta[META]
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    rows.append(("max_pool2d(2)", POOL_OP, ""))


RELU_FUNCTIONS = (F.relu, torch.relu, F.relu_, torch.relu_)
LEAKY_RELU_FUNCTIONS = (F.leaky_relu, F.leaky_relu_)


def _activation(node: fx.Node, root: nn.Module, x: fx.Node) -> tuple[float, bool] | None:
    """(negative slope, 0.0 for ReLU; whether it changes x in place) of an activation node
    applied to x alone, else None."""
    if node.op == "call_module":
        layer = root.get_submodule(node.target)
        if has_hooks(layer) or node.args != (x,) or node.kwargs:
            return None
        if type(layer) is nn.ReLU:
            return 0.0, layer.inplace
        if type(layer) is nn.LeakyReLU and layer.negative_slope >= 0:
            return float(layer.negative_slope), layer.inplace
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return (0.0, node.target == "relu_") if node.args == (x,) and not node.kwargs else None
    if node.op != "call_function" or not node.args or node.args[0] is not x:
        return None
    in_place_function = node.target in (F.relu_, torch.relu_, F.leaky_relu_)
    if node.target in RELU_FUNCTIONS:
        args = _arguments(node, ("input", "inplace"), {"inplace": False})
        return None if args is None else (0.0, in_place_function or bool(args["inplace"]))
    if node.target in LEAKY_RELU_FUNCTIONS:
        args = _arguments(
            node, ("input", "negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False}
        )
        slope = None if args is None else args["negative_slope"]
        if isinstance(slope, int | float) and slope >= 0:
            return float(slope), in_place_function or bool(args["inplace"])
    return None


def _rewrite_conv_chain(graph: fx.Graph, conv: fx.Node, root: nn.Module, rows: list) -> None:
    """conv -> [BatchNorm2d] -> [ReLU/LeakyReLU], each the next one's only input, written in a
    forward (a Sequential's chains are fused by the module swaps)."""
    if len(conv.args) != 1 or conv.kwargs:
        return
    last, batch_norm, (slope, in_place) = conv, None, (None, False)
    user = _single_user(last)
    if user is not None and user.op == "call_module":
        layer = root.get_submodule(user.target)
        if (
            type(layer) is nn.BatchNorm2d
            and not has_hooks(layer)
            and user.args == (last,)
            and not user.kwargs
        ):
            last, batch_norm = user, user
            user = _single_user(last)
    activation = None if user is None else _activation(user, root, last)
    if activation is not None:
        last, (slope, in_place) = user, activation
    if last is conv:
        return
    steps = ["conv2d", *(["batch_norm2d"] if batch_norm is not None else [])]
    if slope is not None:
        steps.append("relu" if slope == 0 else f"leaky_relu({slope:g})")
    if _changed_in_between(conv, last, {batch_norm}):
        rows.append((" + ".join(steps), LEFT, IN_BETWEEN))
        return
    if slope and _changes_in_place_after(last, root):
        why = "a tensor changes in place after it (its output, maybe), which the op saves for"
        why += " the backward where PyTorch's LeakyReLU saves its input"
        rows.append((" + ".join(steps), LEFT, why))
        return
    with graph.inserting_before(last):
        fused = graph.call_function(conv_chain, (
            conv.args[0],
            graph.get_attr(conv.target),
            None if batch_norm is None else graph.get_attr(batch_norm.target),
            slope,
            in_place,
        ))  # fmt: skip
    fused.meta[META] = last.meta[META]
    last.replace_all_uses_with(fused)
    for node in dict.fromkeys(n for n in (last, batch_norm, conv) if n is not None):
        graph.erase_node(node)
    why = "folds while the BatchNorm2d is in eval mode" if batch_norm is not None else ""
    rows.append((" + ".join(steps), CONV_OP, why))


def rewrite(graph: fx.Graph, root: nn.Module) -> list[tuple[str, str, str]]:
    """Put fastunet's ops in place of the graph's patterns; the (pattern, runs on, why) rows."""
    rows: list[tuple[str, str, str]] = []
    # Chains first: they erase nodes after the one visited, so the second pass sees fresh nodes.
    for node in list(graph.nodes):
        if node.op == "call_module":
            layer = root.get_submodule(node.target)
            if isinstance(layer, FusedConv2d):
                _rewrite_conv_chain(graph, node, root, rows)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in CATS:
            _rewrite_cat(graph, node, root, rows)
        elif node.op == "call_function" and node.target in MAX_POOLS:
            _rewrite_max_pool(graph, node, rows)
    return rows


# ---------------------------------------------------------------- the forward that runs


def _generate(graph: fx.Graph, path: str) -> Callable:
    """The graph as a Python function of (module, *arguments), like a GraphModule's forward but
    bound to the live module at each call rather than to copies of its attributes."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<fastunet.accelerate {path or 'model'}>", "exec"), namespace)
    return namespace["forward"]


@dataclass(frozen=True)
class Trace:
    """One call signature's trace: its generated code, or None where the forward runs as
    written; the layers whose calls its ops took over (`fused_layers`), and the links (owner,
    name, layer) from the traced module down to each of them."""

    generated: Callable | None
    fused_layers: tuple[nn.Module, ...] = ()
    links: tuple[tuple[nn.Module, str, nn.Module], ...] = ()

    def holds(self) -> bool:
        """Whether each fused layer is still where the trace found it: the code calls an op
        for the layer it was generated for, not for one set in its place since
        (`block.conv = nn.Conv2d(...)`), which may be of another kind."""
        # A loop rather than all() over a generator: half the time, and it runs at every call.
        for owner, name, layer in self.links:  # noqa: SIM110
            if owner._modules.get(name) is not layer:
                return False
        return True

    def observed(self) -> bool:
        """Whether a hook would see a fused layer's input or output, which the op does not make."""
        return any(observed(layer) for layer in self.fused_layers)


class TracedForward(ForwardStandIn):
    """Stands in for a module's forward: per call signature, the forward traced at the first call
    with that signature and rewritten onto fastunet's ops, or the forward as written when the
    trace found no pattern or could not follow the code."""

    def __init__(
        self, module: nn.Module, path: str, signature: Signature, report: AccelerationReport
    ):
        self.module, self.path, self.signature, self.report = module, path, signature, report
        self.attributes = branch_attributes(module)
        self.traced: dict[tuple, Trace] = {}

    def __getstate__(self) -> dict:
        # Generated functions do not pickle (torch.save of the whole model): traced again after.
        return {**self.__dict__, "traced": {}}

    def __call__(self, *args, **kwargs):
        module = self.module
        values = self.signature.bind(args, kwargs)
        if values is None:  # as written: PyTorch raises the call's TypeError
            return type(module).forward(module, *args, **kwargs)
        key = call_key(module, values, self.attributes)
        if key is None:
            if not torch.compiler.is_compiling():  # a report row is no part of a graph
                why = (
                    "an argument is not a tensor, None or a scalar (a list?), or an attribute it "
                    "may branch on is no longer None or a scalar: runs as written"
                )
                self.report.add(self.path, "forward", LEFT, why)
            return type(module).forward(module, *values)
        symbols = torch.compiler.is_compiling() or any(map(symbolic, values))
        found = traced_for(key, self.traced, symbols)
        if found is not None:
            if inside_pytorch_by_rule():  # its layers all take PyTorch's path: as written
                return type(module).forward(module, *values)
            if found.generated is None or found.observed():
                return type(module).forward(module, *values)  # a hook sees each layer's output
            if found.holds():
                return found.generated(module, *values)
            if not symbols:
                self.traced.pop(key, None)  # a fused layer was replaced: traced again below
        # fx cannot trace inside a torch.jit trace (an internal assert), which also hands sizes
        # as tensors (smp's decoder blocks take a height and a width): a new key there.
        tracing = symbols or torch.jit.is_tracing()
        if tracing or len(self.traced) >= MAX_SIGNATURES:
            return type(module).forward(module, *values)
        return self._run_and_trace(key, values)

    def _run_and_trace(self, key: tuple, values: tuple):
        """The call as written, recording each layer's output shape; then the trace."""
        module = self.module
        records: list = []
        thread = threading.get_ident()

        def record(layer, _inputs, output):
            if threading.get_ident() == thread:  # not a call of the layer in another thread
                records.append((layer, _to_meta(output), _device(output)))

        record.fastunet_records_shapes = True  # not a user's: the layers fuse as they will later
        handles = [layer.register_forward_hook(record) for layer in trace_leaves(module)]
        try:
            output = type(module).forward(module, *values)
        finally:
            for handle in handles:
                handle.remove()
        self.traced[key] = self._trace(values, records)
        return output

    def _trace(self, values: tuple, records: list) -> Trace:
        module = self.module
        concrete = {
            name: value
            for name, value in zip(self.signature.names, values, strict=True)
            if not isinstance(value, Tensor)
        }
        tracer = _ShapeTracer(values, records)
        # The trace runs the forward's Python a second time: what it draws from the random
        # generators, or sets on the modules, is put back.
        state = _ModuleState(module)
        devices = sorted({v.device.index for v in values if isinstance(v, Tensor) and v.is_cuda})
        try:
            with _ONE_TRACE_AT_A_TIME, torch.random.fork_rng(devices=devices), _tracing_guards():
                generators = _random_states(devices)
                graph = tracer.trace(module, concrete_args=concrete or None)
                if not all(map(torch.equal, generators, _random_states(devices))):
                    # torch.rand(1).item() < p, torch.randn(x.shape): drawn once, then fixed
                    raise fx.proxy.TraceError("it draws random numbers the trace would fix")
            if tracer.refused:  # the forward caught the error and went on
                raise fx.proxy.TraceError(tracer.refused)
            if tracer.records:
                raise fx.proxy.TraceError("the trace ran fewer layers than the call did")
            if changed := state.changed():
                # A side effect the traced code would drop, or a tensor made from shapes alone
                # (torch.zeros(x.shape)), which fx keeps as a constant.
                raise fx.proxy.TraceError(f"it sets {', '.join(changed)}, which the traced "
                                          "code would not, or would fix")  # fmt: skip
        except Exception as error:  # whatever the user's code raises under fx: run it as written
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            why = f"not traceable with these inputs, runs as written ({type(error).__name__}"
            self.report.add(self.path, "forward", LEFT, why + (f": {message})" if message else ")"))
            return Trace(None)
        finally:
            state.restore()
        called = Counter(node.target for node in graph.nodes if node.op == "call_module")
        rows = rewrite(graph, module)
        for row in rows:
            self.report.add(self.path, *row)
        if all(runs_on == LEFT for _, runs_on, _ in rows):
            return Trace(None)
        # The layers whose calls the ops took over: a hook on one, registered later, must see
        # the layer's own output, so the forward then runs as written; one replaced since, a
        # trace of its own.
        called.subtract(node.target for node in graph.nodes if node.op == "call_module")
        fused_paths = [path for path, n in called.items() if n > 0]
        links = {}
        for path in fused_paths:
            owner = module
            for name in path.split("."):
                layer = owner._modules[name]
                links[id(owner), name] = (owner, name, layer)
                owner = layer
        fused_layers = tuple(map(module.get_submodule, fused_paths))
        return Trace(_generate(graph, self.path), fused_layers, tuple(links.values()))


def install_traced_forwards(model: nn.Module, report: AccelerationReport) -> None:
    """A TracedForward for every module whose forward may hold a pattern."""
    for path, module in model.named_modules():
        if not wants_trace(module):
            continue
        signature = Signature.of(type(module).forward)
        if signature is None:
            why = "its forward takes *args, **kwargs or keyword-only arguments: runs as written"
            report.add(path, "forward", LEFT, why)
            continue
        module.forward = TracedForward(module, path, signature, report)
