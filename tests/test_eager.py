"""`fastunet.ops._eager.call`: an op's own function and formula without the dispatcher in plain
eager PyTorch, the op through the dispatcher wherever something watches."""

from typing import ClassVar

import pytest
import torch
from helpers import assert_same_bits, backend_device
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fastunet import ops
from fastunet.ops._eager import call


def cases(device):
    """(op, arguments) of each op with an autograd formula, some with defaults left out."""
    x = torch.randn(2, 3, 5, 6, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    b = torch.randn(4, device=device)
    small = torch.randn(2, 3, 3, 4, device=device)
    skip = torch.randn(2, 2, 5, 7, device=device)
    w_concat = torch.randn(4, 5, 3, 3, device=device)
    return {
        "conv2d_relu": (ops.conv2d_relu, (x, w, b)),
        "conv2d_leaky_relu": (ops.conv2d_relu, (x, w, None, 0, True, 0.1)),
        "upsample_concat": (ops.upsample_concat, (small, skip, "bilinear")),
        "max_pool2d": (ops.max_pool2d_with_argmax, (x,)),
        "upsample_concat_conv2d_relu": (
            ops.upsample_concat_conv2d_relu, (small, skip, w_concat, b, 1, False, "nearest"),
        ),
    }  # fmt: skip


CASES = list(cases("cpu"))


def run(function, op, args, grad: bool):
    """The op's outputs, and with grad the gradient of each tensor argument, on fresh leaves."""
    leaves = [a.detach().requires_grad_(grad) if isinstance(a, torch.Tensor) else a for a in args]
    outputs = function(op, *leaves)
    out = outputs[0] if isinstance(outputs, tuple) else outputs
    if not grad:
        return [outputs], out
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
    return [outputs, *grads], out


def through_dispatcher(op, *args):
    return op(*args)


def assert_same(eager, dispatched):
    """Each tensor bit for bit (the argmax of max-pool is uint8)."""
    flat = [[v for value in values for v in (value if isinstance(value, tuple) else (value,))]
            for values in (eager, dispatched)]  # fmt: skip
    for actual, expected in zip(*flat, strict=True):
        if expected.is_floating_point():
            assert_same_bits(actual, expected)
        else:
            assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", CASES)
def test_a_plain_eager_call_gives_the_dispatchers_bits(backend, case, grad):
    """Forward and every gradient, bit for bit, with the op's own formula (an autograd node of
    the eager route's, not the dispatcher's), and the defaults left out filled in."""
    op, args = cases(backend_device(backend))[case]
    eager, out = run(call, op, args, grad)
    dispatched, _ = run(through_dispatcher, op, args, grad)
    assert_same(eager, dispatched)
    if grad:
        assert type(out.grad_fn).__name__.startswith("Eager_")


@pytest.mark.parametrize("case", CASES)
def test_under_autocast_the_op_casts_by_its_own_rule(case):
    """As the op's autocast kernel: its inputs cast (the casts recorded, so each gradient comes
    back in its input's dtype), then the op with autocast off."""

    def autocast(function):
        def run_autocast(op, *args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return function(op, *args)

        return run_autocast

    op, args = cases("cpu")[case]
    eager, out = run(autocast(call), op, args, True)
    dispatched, expected_out = run(autocast(through_dispatcher), op, args, True)
    assert out.dtype == expected_out.dtype
    assert_same(eager, dispatched)


class Seen:
    """A mode that notes the name of every call it sees, then makes it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def note(self, func, args, kwargs):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class SeenOps(Seen, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.note(func, args, kwargs)


class SeenFunctions(Seen, TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.note(func, args, kwargs)


class Marked(torch.Tensor):
    """A tensor subclass whose __torch_function__ notes every call it takes part in."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("watcher", ["dispatch-mode", "function-mode", "subclass", "flops"])
def test_whatever_watches_sees_the_op_itself(watcher):
    """A dispatch mode (FakeTensorMode and export's tracers are ones), a torch-function mode, a
    tensor subclass and FlopCounterMode get the op through the dispatcher, as registered."""
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(2, 3, 3, 3)
    if watcher == "flops":
        with FlopCounterMode(display=False) as counter:
            call(ops.conv2d_relu, x, w)
        assert counter.get_total_flops() == 2 * 2 * 16 * 27
        return
    if watcher == "subclass":
        Marked.seen = []
        call(ops.conv2d_relu, x.as_subclass(Marked), w)
        seen = Marked.seen
    else:
        mode = SeenOps() if watcher == "dispatch-mode" else SeenFunctions()
        with mode:
            call(ops.conv2d_relu, x, w)
        seen = mode.seen
    assert any("fastunet.conv2d_relu" in name for name in seen), seen


def test_a_jit_trace_records_the_op():
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(2, 3, 3, 3)
    traced = torch.jit.trace(lambda a, b: call(ops.conv2d_relu, a, b), (x, w), check_trace=False)
    assert "fastunet::conv2d_relu" in str(traced.graph)
    assert torch.equal(traced(x, w), ops.conv2d_relu(x, w))


def test_the_profiler_shows_each_eager_call_under_its_ops_name():
    """profile_model.py reads the host time of each op from events named fastunet::<op>."""
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, requires_grad=True)
    with torch.profiler.profile() as profile:
        call(ops.conv2d_relu, x, w).sum().backward()
    names = {event.name for event in profile.events()}
    assert {"fastunet::conv2d_relu", "fastunet::conv2d_relu_grad_output"} <= names
    assert "fastunet::conv2d_grad" in names


def test_a_call_missing_an_argument_gets_the_ops_own_error():
    with pytest.raises(RuntimeError, match="missing value for argument 'weight'"):
        call(ops.conv2d_relu, torch.randn(1, 3, 4, 4))


def test_tensors_the_dispatcher_resolves_first_go_through_it(backend):
    """A lazy negation (a neg view) and a ZeroTensor (a gradient without memory, as sgn's
    backward gives) would reach the kernels' raw pointers as they are: the dispatcher turns
    them into plain tensors first. Before, the negation was dropped and the ZeroTensor crashed
    the process."""
    x = torch.randn(1, 2, 4, 6, device=backend_device(backend))
    pooled, _ = call(ops.max_pool2d_with_argmax, torch._neg_view(x))
    assert torch.equal(pooled, ops.max_pool2d(-x))
    leaf = x.clone().requires_grad_()
    torch.sgn(call(ops.max_pool2d_with_argmax, leaf)[0]).sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(x))


def test_where_autograd_is_excluded_nothing_is_recorded():
    """inference_mode (even with grad mode on inside it) and a custom op's own kernel exclude
    autograd: the dispatcher records nothing there, and neither does call."""
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(2, 3, 3, 3, requires_grad=True)
    with torch.inference_mode(), torch.enable_grad():
        out = call(ops.conv2d_relu, x, w)
    assert out.is_inference() and not out.requires_grad
    with torch._C._AutoDispatchBelowAutograd():
        out = call(ops.conv2d_relu, x, w)
    assert not out.requires_grad
    assert torch.equal(out, ops.conv2d_relu(x, w).detach())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES)
def test_batched_gradients_match_one_at_a_time(backend, case, layout):
    """grad(is_grads_batched=True), as jacobian(vectorize=True) uses, runs the backward under
    autograd's own vmap, on batched tensors of class Tensor: the backward's op calls must go
    through the dispatcher there. Before, they ran the ops' functions on the batched tensors and
    failed (no storage, no data pointer); and the conv backward's gradient in channels_last
    (which that vmap's tensors cannot take) failed for channels_last inputs."""
    op, args = cases(backend_device(backend))[case]
    if layout == "channels_last":
        args = [a.contiguous(memory_format=torch.channels_last)
                if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]  # fmt: skip
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    outputs = op(*leaves)
    out = outputs[0] if isinstance(outputs, tuple) else outputs
    grad_outputs = torch.randn(3, *out.shape, device=out.device)
    batched = torch.autograd.grad(
        out, tensors, grad_outputs, retain_graph=True, is_grads_batched=True
    )
    for i, grad_output in enumerate(grad_outputs):
        one = torch.autograd.grad(out, tensors, grad_output, retain_graph=True)
        for got, expected in zip(batched, one, strict=True):
            torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


def test_an_fx_trace_records_the_op():
    graph = torch.fx.symbolic_trace(ops.max_pool2d).graph
    assert "fastunet.max_pool2d_with_argmax" in str([node.target for node in graph.nodes])


@pytest.mark.parametrize("first", [None, 1.0, "x"])
def test_a_wrong_first_argument_gets_the_ops_own_error(first):
    with pytest.raises(Exception) as expected:
        ops.conv2d_relu(first, torch.randn(2, 3, 3, 3))
    with pytest.raises(type(expected.value)) as got:
        call(ops.conv2d_relu, first, torch.randn(2, 3, 3, 3))
    assert str(got.value) == str(expected.value)
