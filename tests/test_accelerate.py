"""fastunet.accelerate on the UNets people have: models written here in milesial's and smp's
styles, ReferenceUNet's functional style, and MONAI's own BasicUNet.

Each accelerated model must give the original's output, input gradient, parameter gradients and
buffers (fp32, within 1e-5 relative), in eval and training mode, keep its state_dict keys, and
run its convolutions, pools and upsample-concats on fastunet's ops, counted as they run. Most
tests force the torch composite inside the ops (fast); the `kernels` tests run the Triton
kernels (in the interpreter without a GPU) on a tiny model.
"""

import collections
import contextlib
import copy
import inspect
import io
import os
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
import torch.utils.checkpoint
from helpers import INPUT_LAYOUTS, KERNEL_DEVICE, backend_device, drawn, in_layout
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fastunet
from fastunet import kernels
from fastunet._accelerate import modules
from fastunet.bench.parity import relative_error
from fastunet.bench.styles import MilesialStyleUNet, SmpStyleUNet
from fastunet.ops import _choice

CONV, POOL, UPCAT = (
    "fastunet::conv2d_relu",
    "fastunet::max_pool2d_with_argmax",
    ("fastunet::upsample_concat"),
)


class OpCounter(TorchDispatchMode):
    """Counts the ops that run, by name ("fastunet::conv2d_relu", "aten::convolution"); the ops
    inside a fastunet op's torch composite are not seen."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def monai_unet(**config) -> nn.Module:
    nets = pytest.importorskip("monai.networks.nets")
    return nets.BasicUNet(
        spatial_dims=2, in_channels=3, out_channels=2, features=(4, 4, 8, 8, 16, 4), **config
    )


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    size: int
    # The fastunet ops one forward runs once traced, and the aten ops it still runs.
    ops: dict[str, int]
    left: dict[str, int] = field(default_factory=dict)


BATCH_RELU = dict(norm=("batch", {}), act="relu", upsample="nontrainable")
CASES = [
    Case("milesial-bilinear", lambda: MilesialStyleUNet(3, 2, 4, 3), 16,
         {CONV: 15, POOL: 3, UPCAT: 3}),
    Case("milesial-transposed", lambda: MilesialStyleUNet(3, 2, 4, 3, bilinear=False), 16,
         {CONV: 15, POOL: 3}, {"aten::convolution": 3, "aten::cat": 3}),
    Case("smp", lambda: SmpStyleUNet(3, 2, (4, 8, 8, 16), (8, 8, 4, 4)), 32,
         {CONV: 15, POOL: 3, UPCAT: 3}, {"aten::convolution": 1}),
    Case("reference-nearest", lambda: fastunet.ReferenceUNet(3, 2, 4, 3), 16,
         {CONV: 15, POOL: 3, UPCAT: 3}),
    Case("reference-bilinear-odd", lambda: fastunet.ReferenceUNet(3, 2, 4, 2, "bilinear", True),
         19, {CONV: 11, POOL: 2, UPCAT: 2}),
    # MONAI's default: instance norm (not folded), LeakyReLU, transposed-conv upsampling.
    Case("monai-default", lambda: monai_unet(), 32,
         {CONV: 19, POOL: 4}, {"aten::convolution": 4, "aten::cat": 4}),
    Case("monai-batch-relu-bilinear", lambda: monai_unet(**BATCH_RELU), 32,
         {CONV: 22, POOL: 4, UPCAT: 4}),
    # 40 -> 20 -> 10 -> 5 -> 2: the bottom level's replicate pad is not zero, so its cat stays.
    Case("monai-odd-size", lambda: monai_unet(**BATCH_RELU), 40,
         {CONV: 22, POOL: 4, UPCAT: 3}, {"aten::cat": 1}),
    Case("monai-leaky-dropout",
         lambda: monai_unet(norm=("batch", {}), dropout=0.1, upsample="nontrainable"), 32,
         {CONV: 22, POOL: 4, UPCAT: 4}),
]  # fmt: skip
UNFUSED = ("aten::convolution", "aten::cat", "aten::max_pool2d_with_indices")


def assert_close(name: str, ours, theirs, truth, floor: float = 0.0) -> None:
    """The project's fp32 parity rule: against float64, within 1e-5 relative, or within 2x the
    original's own error where that is larger (a bias gradient is a sum that cancels). `floor`
    absorbs the noise of gradients that are zero in exact arithmetic (a conv bias before a
    training-mode BatchNorm)."""
    norm = torch.linalg.vector_norm
    error = norm((ours - truth).double())
    bound = 2 * norm((theirs - truth).double()) + 1e-5 * norm(truth.double()) + floor
    assert error <= bound, (
        f"{name}: relative error {relative_error(ours, truth):.3g}, "
        f"the original's {relative_error(theirs, truth):.3g}"
    )


def step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, d(loss)/d(x), every parameter's gradient and every buffer after one step; the
    seed makes dropout draw the same masks in each model."""
    model.zero_grad(set_to_none=True)
    x = x.detach().to(next(model.parameters()).dtype).requires_grad_()
    torch.manual_seed(1)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
    return {"output": out, "grad_input": x.grad, **grads, **buffers}


def compare(original: nn.Module, fast: nn.Module, x: torch.Tensor, count: bool = True):
    """One step of the accelerated model against the original's and a float64 copy's; returns
    the ops the accelerated model ran (counting is left out under torch.compile, which does not
    trace under a dispatch mode)."""
    truth = step(copy.deepcopy(original).double(), x)
    theirs = step(original, x)
    counter = OpCounter()
    with counter if count else contextlib.nullcontext():
        ours = step(fast, x)
    assert ours.keys() == theirs.keys()
    assert ours["output"].dtype == theirs["output"].dtype
    grads = [torch.linalg.vector_norm(t) for name, t in truth.items() if name.startswith("grad")]
    floor = 1e-7 * max(grads)  # fp32's epsilon of the largest gradient
    for name, value in ours.items():
        assert_close(name, value, theirs[name], truth[name], floor)
    return counter.counts


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_the_original_and_runs_fastunet_ops(case, torch_backend):
    torch.manual_seed(0)
    original = case.build()
    fast = fastunet.accelerate(original)
    assert fast is not original
    x = torch.randn(2, 3, case.size, case.size)
    for training in (False, True):
        original.train(training)
        fast.train(training)
        # The first call with these shapes runs each traced forward as written, then traces it;
        # the second runs the traced code.
        for _ in range(2):
            counts = compare(original, fast, x)
        ran = {op: counts[op] for op in (CONV, POOL, UPCAT) if counts[op]}
        assert ran == case.ops, f"training={training}"
        assert {op: counts[op] for op in UNFUSED if counts[op]} == case.left
        # The backward runs on fastunet's ops too.
        assert counts["fastunet::conv2d_grad"] == case.ops[CONV]
        assert counts["fastunet::max_pool2d_backward"] == case.ops[POOL]


def _gradient_penalty_step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of a gradient penalty: the input gradient's squared norm."""
    model.zero_grad(set_to_none=True)
    x = x.detach().to(next(model.parameters()).dtype).requires_grad_()
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["milesial-bilinear", "reference-bilinear-odd"])
def test_a_gradient_penalty_matches_the_originals(name, torch_backend):
    """create_graph=True through the ops' backward (conv + BatchNorm + ReLU chains, max-pool,
    upsample + cat); before, it raised "no autograd formula"."""
    case = next(case for case in CASES if case.name == name)
    torch.manual_seed(0)
    original = case.build()
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, case.size, case.size)
    fast(x)  # the first call traces the forward; the second runs the ops
    truth = _gradient_penalty_step(copy.deepcopy(original).double(), x)
    theirs = _gradient_penalty_step(original, x)
    with OpCounter() as counter:
        ours = _gradient_penalty_step(fast, x)
    assert counter.counts[CONV] > 0
    for key, value in ours.items():
        assert_close(key, value, theirs[key], truth[key])


def test_an_instance_norm_before_a_replaced_conv_gets_its_gradient_in_its_layout(torch_backend):
    """At batch 1, PyTorch 2.13's CPU InstanceNorm2d backward is wrong for a channels_last
    gradient: the replaced conv must hand an NCHW input an NCHW gradient, as nn.Conv2d does.
    Before, every gradient before the norm was off by about 100% (found by a fuzzer)."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.GELU(),
                             nn.Conv2d(4, 2, 3, padding=1))  # fmt: skip
    fast = fastunet.accelerate(original)
    counts = compare(original, fast, torch.randn(1, 3, 8, 8))
    assert counts[CONV] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_half_precision_fold_is_rounded_once(dtype):
    """An eval BatchNorm2d folded into fp16 or bf16 weights: computed in fp32 and rounded once,
    not at each step: a fuzzer's half-precision models in eval mode had gradients up to 50x
    further from float64 than the original's, and rounding once brought 4 of its 7 flagged cases
    within the parity rule. Large running statistics make each extra rounding show."""
    torch.manual_seed(0)
    batch_norm = nn.BatchNorm2d(8).eval()
    batch_norm.running_var.uniform_(0.01, 50)
    batch_norm.running_mean.normal_(0, 3)
    nn.init.normal_(batch_norm.weight, 1, 0.5)
    nn.init.normal_(batch_norm.bias)
    weight, bias, batch_norm = torch.randn(8, 3, 3, 3), torch.randn(8), batch_norm.to(dtype)
    weight, bias = weight.to(dtype), bias.to(dtype)
    in_fp32 = modules.fold_batch_norm(
        weight.float(), bias.float(), copy.deepcopy(batch_norm).float()
    )
    expected = [t.to(dtype) for t in in_fp32]
    folded = modules.fold_batch_norm(weight, bias, batch_norm)
    for got, want in zip(folded, expected, strict=True):
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("case", CASES[:1] + CASES[-1:], ids=lambda case: case.name)
def test_state_dict_round_trip(case, torch_backend):
    torch.manual_seed(0)
    original = case.build()
    fast = fastunet.accelerate(original).eval()
    assert list(fast.state_dict()) == list(original.state_dict())
    x = torch.randn(1, 3, case.size, case.size)
    fast(x)  # traced with the old weights: the traced code must read the live ones
    other = case.build().eval()
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t)).abs_()  # running_var stays positive
    fast.load_state_dict(other.state_dict(), strict=True)
    assert torch.allclose(fast(x), other(x), rtol=1e-5, atol=1e-6)
    original.load_state_dict(fast.state_dict(), strict=True)
    for name, t in fast.state_dict().items():
        assert torch.equal(t, original.state_dict()[name]), name
    saved = io.BytesIO()
    torch.save(fast, saved)  # the whole module pickles; its traces are made again after loading
    saved.seek(0)
    assert torch.equal(torch.load(saved, weights_only=False)(x), fast(x))


def test_inplace_keeps_the_parameters(torch_backend):
    model = MilesialStyleUNet(3, 2, 4, 2)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    fast = fastunet.accelerate(model, inplace=True)
    assert fast is model
    assert all(a is b for a, b in zip(fast.parameters(), parameters, strict=True))
    fast(torch.randn(1, 3, 16, 16)).sum().backward()
    before = parameters[0].detach().clone()
    optimizer.step()
    assert not torch.equal(parameters[0], before)


def _holding_more(conv: nn.Conv2d) -> nn.Conv2d:
    """The conv with what users register on one: a mask buffer, a gain and a tag."""
    conv.register_buffer("mask", torch.ones_like(conv.weight))
    conv.gain = nn.Parameter(torch.full((1,), 0.5))
    conv.tag = "mine"
    return conv


@pytest.mark.parametrize("inplace", [False, True])
def test_a_conv_keeps_its_buffers_parameters_and_attributes(inplace, torch_backend):
    """A Conv2d becomes a FusedConv2d by a change of its class, so what is registered on it
    stays. (A new FusedConv2d took over weight and bias alone: the state_dict lost keys, an
    optimizer built after lost the gain, the original's checkpoint no longer loaded strictly.)"""
    torch.manual_seed(0)
    original = nn.Sequential(
        _holding_more(nn.Conv2d(3, 4, 3, padding="same")), nn.ReLU(),  # a chain
        _holding_more(nn.Conv2d(4, 2, 1)),  # a conv alone
    )  # fmt: skip
    reference = copy.deepcopy(original)
    keys, parameters = list(original.state_dict()), list(original.parameters())
    fast = fastunet.accelerate(original, inplace=inplace)
    assert [type(fast[i]).__name__ for i in (0, 2)] == ["FusedConv2d", "FusedConv2d"]
    assert list(fast.state_dict()) == keys and len(list(fast.parameters())) == len(parameters)
    assert all((a is b) == inplace for a, b in zip(fast.parameters(), parameters, strict=True))
    assert fast[0].tag == fast[2].tag == "mine" and fast[0].padding == (1, 1)  # was "same"
    fast.load_state_dict(reference.state_dict(), strict=True)
    for _ in range(2):
        counts = compare(reference, fast, torch.randn(2, 3, 8, 8))
        assert counts[CONV] == 2


def test_a_pruned_model_that_cannot_be_copied_says_to_accelerate_it_in_place(torch_backend):
    """torch.nn.utils.prune leaves each weight a computed tensor, which deepcopy refuses; the
    error says that accelerate copies and what to do. In place, the pruned model keeps its
    output (its convs have the pruning hooks, so they run as themselves)."""
    torch.manual_seed(0)
    model = MilesialStyleUNet(3, 2, 4).eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            torch.nn.utils.prune.l1_unstructured(module, "weight", 0.5)
    with pytest.raises(RuntimeError, match=r"cannot be deep-copied.*inplace=True"):
        fastunet.accelerate(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    fast = fastunet.accelerate(model, inplace=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected)


def test_on_meta_tensors_it_counts_the_originals_flops():
    """As fastunet.bench.accelerated.flops does for the model as written: no data to time, so
    each layer runs PyTorch's path, which FlopCounterMode counts."""
    original = MilesialStyleUNet(3, 2, 4, 2).to("meta")
    flops = []
    for model in (original, fastunet.accelerate(original)):
        x = torch.empty(2, 3, 16, 16, device="meta", requires_grad=True)
        for _ in range(2):  # the first call traces the decoders; the second runs the trace
            with FlopCounterMode(display=False) as counter:
                out = model(x)
                out.sum().backward()
            assert out.shape == (2, 2, 16, 16) and out.device.type == "meta"
            flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] == flops[2] == flops[3] > 0


def test_autocast(torch_backend):
    torch.manual_seed(0)
    for original in (MilesialStyleUNet(3, 2, 4, 3).eval(), monai_unet(**BATCH_RELU).eval()):
        fast = fastunet.accelerate(original)
        x = torch.randn(2, 3, 32, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = original(x)
            for _ in range(2):
                fast_out = fast(x)
        assert fast_out.dtype == out.dtype == torch.bfloat16
        assert relative_error(fast_out, out) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(training, torch_backend):
    """The accelerated model compiles with fullgraph=True and its graph holds fastunet's ops."""
    torch.manual_seed(0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    original = MilesialStyleUNet(3, 2, 4, 3).train(training)
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 32, 32)
    compare(original, fast, x)  # eager: traces the decoder blocks' forwards for these shapes
    torch._dynamo.reset()
    fast.compile(backend=backend, fullgraph=True)  # in place: the parameter names stay
    compare(original, fast, x, count=False)
    targets = collections.Counter(str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert targets["fastunet.conv2d_relu.default"] == 15
    assert targets["fastunet.max_pool2d_with_argmax.default"] == 3
    assert targets["fastunet.upsample_concat.default"] == 3


def test_an_instance_forward_keeps_its_signature(torch_backend):
    """A forward set on the instance before accelerate (a wrapper taking `image`) is what the
    model's stand-in shows, so export's dynamic_shapes can name its argument."""
    torch.manual_seed(0)
    model = MilesialStyleUNet(3, 2, 4).eval()
    model.forward = lambda image: type(model).forward(model, image * 2)
    x, x3 = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x3)
    fast = fastunet.accelerate(model, inplace=True)  # the lambda calls model, not a copy
    assert list(inspect.signature(fast.forward).parameters) == ["image"]
    exported = torch.export.export(fast, (x,), dynamic_shapes={"image": {0: torch.export.Dim("n")}})
    torch.testing.assert_close(exported.module()(x3), expected)


def test_torch_compile_dynamic_compiles_one_graph_for_every_batch_size(torch_backend):
    """Under dynamic=True the sizes are symbolic, and the traces are keyed by concrete sizes:
    the traced forwards run as written, in one graph for every batch size. (Looking the sizes up
    in a dict made dynamo guard on them: a graph per size, up to its recompile limit.)"""
    torch.manual_seed(0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    original = MilesialStyleUNet(3, 2, 4).eval()
    fast = fastunet.accelerate(original)
    torch._dynamo.reset()
    with torch.no_grad():
        fast(torch.randn(2, 3, 16, 16))  # a trace for batch 2
        compiled = torch.compile(fast, dynamic=True, backend=backend)
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 16, 16)
            torch.testing.assert_close(compiled(x), original(x))
    assert len(graphs) == 1
    assert "fastunet.conv2d_relu.default" in {str(node.target) for node in graphs[0].graph.nodes}


def test_torch_compile_works_after_the_first_trace_in_a_new_process():
    """torch._dynamo was first imported by a trace's meta computation, while isinstance was the
    trace's: it kept that one in its tables, and from then on torch.compile failed on any
    isinstance, in this model (fullgraph) or any other. As a user runs it: a new process, the
    CPU rule (no interpreter, no forced backend)."""
    script = textwrap.dedent("""
        import sys
        import torch
        import fastunet
        from fastunet.bench.styles import MilesialStyleUNet
        assert "torch._dynamo" not in sys.modules, "imported before the trace: nothing to test"
        original = MilesialStyleUNet(3, 2, 4).eval()
        fast = fastunet.accelerate(original)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            fast(x)  # traces the decoder blocks
            compiled = torch.compile(fast, fullgraph=True, backend="eager")
            assert torch.equal(compiled(x), original(x))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTUNET_BACKEND")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("batch", ["static", "dynamic"])
@pytest.mark.parametrize(
    "name, stand_in",
    [("", "RuleScopedForward"), ("ups.0", "TracedForward"), ("stem", "ChainForward")],
    ids=["model", "decoder-block", "sequential"],
)
def test_torch_export(name, stand_in, batch, strict, torch_backend):
    """torch.export (non-strict, its default) reads the forward's `__code__`, which the objects
    accelerate puts in place of forwards lacked: AttributeError. `dynamic_shapes` names the
    forward's arguments, which the stand-ins' `*args` hid. A traced forward looked its traces up
    by the sizes: non-strict, a symbolic size does not hash (TypeError); strict, the lookup
    specialized the dynamic batch (export's UserError). The exported program, saved and loaded,
    computes the original's output on fastunet's ops, at another batch size where that one is
    dynamic."""
    torch.manual_seed(0)
    original = MilesialStyleUNet(3, 2, 4).eval()
    fast = fastunet.accelerate(original)
    part = fast.get_submodule(name)
    assert type(part.forward).__name__ == stand_in
    inputs = []
    hook = original.get_submodule(name).register_forward_pre_hook(lambda _, a: inputs.append(a))
    with torch.no_grad():
        for size in (2, 3):
            original(torch.randn(size, 3, 16, 16))
    hook.remove()
    names = list(inspect.signature(type(part).forward).parameters)[1:]  # as a user reads it
    assert list(inspect.signature(part.forward).parameters) == names
    dynamic_shapes = None
    if batch == "dynamic":
        size = torch.export.Dim("batch")
        dynamic_shapes = {arg: {0: size} for arg in names[: len(inputs[0])]}
    exported = torch.export.export(part, inputs[0], dynamic_shapes=dynamic_shapes, strict=strict)
    saved = io.BytesIO()
    torch.export.save(exported, saved)
    saved.seek(0)
    run_at = inputs[1] if batch == "dynamic" else inputs[0]
    with torch.no_grad():
        expected = original.get_submodule(name)(*run_at)
    torch.testing.assert_close(torch.export.load(saved).module()(*run_at), expected)
    assert "fastunet.conv2d_relu.default" in {str(node.target) for node in exported.graph.nodes}


class SizedUp(nn.Module):
    """As smp 0.6's decoder blocks: the size to upsample to comes in as arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(6, 3, 3, padding=1), nn.ReLU())

    def forward(self, x, skip, height, width):
        x = F.interpolate(x, size=(height, width), mode="nearest")
        return self.conv(torch.cat([skip, x], 1))


class SizesFromShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Conv2d(3, 3, 3, padding=1), SizedUp()

    def forward(self, x):
        return self.up(F.max_pool2d(self.down(x), 2), x, x.shape[-2], x.shape[-1])


@pytest.mark.parametrize("warm_up", [True, False], ids=["after-a-call", "first-call"])
def test_torch_jit_trace_of_a_block_given_sizes(warm_up, torch_backend):
    """Inside torch.jit.trace, sizes read from shapes are tensors: a new call signature, which
    the traced forward traced with fx inside the jit trace, and the jit tracer's internal assert
    failed (as for smp's Unet). Such a call now runs the forward as written, on the ops."""
    torch.manual_seed(0)
    original = SizesFromShapes().eval()
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        if warm_up:
            fast(x)
        traced = torch.jit.trace(fast, x)
        torch.testing.assert_close(traced(x), original(x))
    assert "fastunet::conv2d_relu" in str(traced.inlined_graph)


def test_torch_jit_trace_checks_a_sequential_leaky_relu_chain(torch_backend):
    """jit.trace checks its graph by tracing again under no_grad, and a Sequential's conv +
    LeakyReLU ran the LeakyReLU apart where autograd records, in the op elsewhere: the graphs
    differed and the check failed. Inside a jit trace it runs apart, right in both modes, so the
    traced graph trains too."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(4, 2, 1))
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(fast, x)  # check_trace=True, as by default
    assert "fastunet::conv2d_relu" in str(traced.inlined_graph)
    compare(original, traced, x, count=False)


def test_a_chains_activation_is_read_at_each_call(torch_backend):
    """A LeakyReLU's slope changed after accelerate: the chain's op used the slope it had
    then. Made negative (which the op cannot compute), the layers run as themselves."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.01))
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 8, 8)
    for slope in (0.5, -0.2):
        original[1].negative_slope = fast[1].negative_slope = slope
        assert compare(original, fast, x)[CONV] == 1  # with the slope, or the conv alone


def test_report_says_a_batch_norm_without_running_statistics_does_not_fold(torch_backend):
    batch_norm = nn.BatchNorm2d(4, track_running_stats=False)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), batch_norm, nn.ReLU()).eval()
    fast = fastunet.accelerate(original)
    rows = {row.module: row for row in fastunet.acceleration_report(fast).rows}
    assert rows["0"].pattern == "conv2d + batch_norm2d (batch statistics, runs apart) + relu"
    compare(original, fast, torch.randn(2, 3, 8, 8))


def test_report_says_what_was_replaced_and_what_was_left(torch_backend):
    fast = fastunet.accelerate(SmpStyleUNet(3, 2, (4, 8, 8, 16), (8, 8, 4, 4)))
    report = fastunet.acceleration_report(fast)
    rows = {row.module: row for row in report.rows}
    assert rows["encoder.0.0"].runs_on == "PyTorch (left)"
    assert "stride (2, 2)" in rows["encoder.0.0"].why
    assert rows["decoder.0.conv1.0"].pattern == "conv2d + batch_norm2d (folded in eval) + relu"
    assert "decoder.0" not in rows  # its forward is traced at its first call
    fast(torch.randn(1, 3, 32, 32))
    rows = {row.module: row for row in report.rows}
    assert rows["decoder.0"].pattern == "upsample(nearest) + cat([up, skip])"
    assert rows["decoder.0"].runs_on == UPCAT
    text = str(report)
    assert text.startswith(f"fastunet.accelerate: {len(report.replaced())} replaced, 1 left")
    assert "encoder.0.0" in text and "decoder.3.conv2.0" in text


# ---------------------------------------------------------------- what is left, and why


class _ValueBranch(nn.Module):
    """A forward whose Python branches on a tensor's value: not traceable, runs as written."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            y = -y
        return torch.cat([x, F.relu(y)], 1)


class _ResNetStyle(nn.Module):
    """conv -> bn -> relu written in a forward, one ReLU module shared by two chains, an upsample
    used twice (so not fused), a max-pool of kernel 3 (not fused)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        low = F.max_pool2d(y, 3, 2, 1)
        up = self.up(low)
        return torch.cat([y, up], 1) + up.sum()


def test_left_patterns_still_match(torch_backend):
    torch.manual_seed(0)
    for original in (_ValueBranch(), _ResNetStyle()):
        fast = fastunet.accelerate(original)
        x = torch.randn(2, 3, 8, 8)
        for training in (False, True):
            original.train(training)
            fast.train(training)
            for _ in range(2):
                compare(original, fast, x)
    rows = {(r.module, r.pattern): r for r in fastunet.acceleration_report(fast).rows}
    assert rows[("(model)", "conv2d + batch_norm2d + relu")].runs_on == CONV
    assert rows[("(model)", "max_pool2d")].runs_on == "PyTorch (left)"
    assert "used elsewhere" in rows[("(model)", "upsample + cat([skip, up])")].why


class _Conv2dSubclass(nn.Conv2d):
    pass


class _MaxPool2dSubclass(nn.MaxPool2d):
    pass


def _weight_normed_conv() -> nn.Conv2d:
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))


def _doubled(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return 2 * nn.Conv2d.forward(conv, x)


def _forward_on_the_instance(conv: nn.Conv2d) -> nn.Conv2d:
    conv.forward = types.MethodType(_doubled, conv)  # deepcopy binds it to the copy
    return conv


def _hooked(layer: nn.Module) -> nn.Module:
    layer.register_forward_hook(lambda module, args, out: None)
    return layer


# (layer, its reason to be left, or "" where an op computes it), each tried before a ReLU.
LAYERS = {
    "conv-valid": (lambda: nn.Conv2d(3, 4, 3, padding="valid"), ""),
    "conv-same": (lambda: nn.Conv2d(3, 4, 3, padding="same"), ""),
    "conv-1x1-no-bias": (lambda: nn.Conv2d(3, 4, 1, bias=False), ""),
    "conv-5x5": (lambda: nn.Conv2d(3, 4, 5, padding=2), ""),
    "conv-stride": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), "stride (2, 2)"),
    "conv-dilation": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), "dilation (2, 2)"),
    "conv-groups": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), "groups=3"),
    "conv-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                     "padding_mode='reflect'"),
    "conv-same-3x5": (lambda: nn.Conv2d(3, 4, (3, 5), padding="same"), "not one symmetric"),
    "conv-padding-1x2": (lambda: nn.Conv2d(3, 4, 3, padding=(1, 2)), "pads H and W alike"),
    "conv-subclass": (lambda: _Conv2dSubclass(3, 4, 3, padding=1), "subclasses nn.Conv2d"),
    "conv-weight-norm": (_weight_normed_conv, "parametrized"),
    "conv-instance-forward": (lambda: _forward_on_the_instance(nn.Conv2d(3, 4, 3, padding=1)),
                              "forward is set on the instance"),
    "conv-hooked": (lambda: _hooked(nn.Conv2d(3, 4, 3, padding=1)), "hooks"),
    "pool": (lambda: nn.MaxPool2d((2, 2)), ""),
    "pool-3": (lambda: nn.MaxPool2d(3), "kernel_size=3"),
    "pool-stride-1": (lambda: nn.MaxPool2d(2, stride=1), "stride=1"),
    "pool-padding": (lambda: nn.MaxPool2d(2, padding=1), "padding=1"),
    "pool-dilation": (lambda: nn.MaxPool2d(2, dilation=2), "dilation=2"),
    "pool-ceil": (lambda: nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
    "pool-subclass": (lambda: _MaxPool2dSubclass(2), "subclasses nn.MaxPool2d"),
    "pool-hooked": (lambda: _hooked(nn.MaxPool2d(2)), "hooks"),
}  # fmt: skip


@pytest.mark.parametrize("name", LAYERS)
def test_a_layer_the_ops_do_not_compute_is_left_and_says_why(name, torch_backend):
    """Each variant of Conv2d and MaxPool2d either runs on an op that computes it exactly or is
    left as it is with its reason; either way the model's results are the original's."""
    build, why = LAYERS[name]
    torch.manual_seed(0)
    layer = build()
    channels = layer(torch.randn(1, 3, 9, 8)).shape[1]
    original = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(channels, 2, 1))  # a pool has no weights
    fast = fastunet.accelerate(original)
    (row, *_) = fastunet.acceleration_report(fast).rows
    assert row.module == "0"
    if why:
        assert row.runs_on == "PyTorch (left)" and why in row.why, row
    else:
        assert row.runs_on in (CONV, "fastunet::max_pool2d"), row
    x = torch.randn(2, 3, 9, 8)
    for training in (False, True):
        original.train(training)
        fast.train(training)
        compare(original, fast, x, count=False)


class _KeywordUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(7, 3, 3, padding=1)

    def forward(self, low, skip, scale=2, mode="nearest"):
        up = F.interpolate(low, scale_factor=scale, mode=mode)
        return F.relu(self.conv(torch.cat([skip, up], 1)))


class _KeywordCalls(nn.Module):
    """A decoder block called with its arguments in other forms: a traced forward binds them to
    its parameters (and its defaults) before it looks its trace up."""

    def __init__(self, call):
        super().__init__()
        self.down, self.up, self.call = nn.Conv2d(3, 4, 3, padding=1), _KeywordUp(), call

    def forward(self, x):
        low = F.max_pool2d(self.down(x), 2)
        return self.call(self.up, low, x)


KEYWORD_CALLS = {
    "positional": lambda up, low, skip: up(low, skip),
    "keywords": lambda up, low, skip: up(low=low, skip=skip),
    "reordered": lambda up, low, skip: up(skip=skip, low=low),
    "mixed": lambda up, low, skip: up(low, skip=skip, mode="nearest"),
    "bilinear": lambda up, low, skip: up(low, skip, mode="bilinear"),
    "all": lambda up, low, skip: up(low, skip, 2, "bilinear"),
}


@pytest.mark.parametrize("call", KEYWORD_CALLS)
def test_a_traced_forward_binds_keyword_calls(call, torch_backend):
    torch.manual_seed(0)
    original = _KeywordCalls(KEYWORD_CALLS[call]).eval()
    fast = fastunet.accelerate(original)
    for _ in range(2):  # traces, then runs the trace
        counts = compare(original, fast, torch.randn(2, 3, 8, 6))
    assert counts[UPCAT] == 1 and counts[CONV] == 2


class _Decoder(nn.Module):
    """A decoder block whose forward is one of DECODER_CODE's (a forward of its own, since
    accelerate traces a forward whose code names a pattern)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(7, 3, 3, padding=1)


def _decoder_forwards():
    def cat_tuple(self, low, skip):
        return F.relu(self.conv(torch.cat((skip, F.interpolate(low, scale_factor=2)), dim=1)))

    def cat_negative_dim(self, low, skip):
        return F.relu(self.conv(torch.cat([skip, F.interpolate(low, scale_factor=2.0)], -3)))

    def concat_upsampled_first(self, low, skip):
        up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.concat([up, skip], 1)).relu()

    def concatenate_axis(self, low, skip):
        up = F.interpolate(low, scale_factor=2, mode="nearest")
        return F.leaky_relu(self.conv(torch.concatenate([skip, up], axis=1)), 0.2)

    def pad_on_a_shape_branch(self, low, skip):
        up = F.interpolate(low, scale_factor=2)
        if up.ndim == 4 and len(up) > 0 and up.numel() > 0:  # shapes, read while tracing
            up = F.pad(up, [0, skip.size(3) - up.size(3), 0, skip.size(2) - up.size(2)])
        return torch.relu(self.conv(torch.cat([skip, up], 1)))

    def bicubic(self, low, skip):
        return F.relu(self.conv(torch.cat([skip, F.interpolate(low, scale_factor=2,
                                                               mode="bicubic")], 1)))  # fmt: skip

    def upsampled_used_twice(self, low, skip):
        up = F.interpolate(low, scale_factor=2)
        return F.relu(self.conv(torch.cat([skip, up], 1))) + up.mean()

    def scale_three(self, low, skip):
        up = F.interpolate(low, scale_factor=3)[..., : skip.shape[2], : skip.shape[3]]
        return F.relu(self.conv(torch.cat([skip, up], 1)))

    return {f.__name__: f for f in (cat_tuple, cat_negative_dim, concat_upsampled_first,
                                    concatenate_axis, pad_on_a_shape_branch, bicubic,
                                    upsampled_used_twice, scale_three)}  # fmt: skip


# name -> "" where the upsample + cat runs on the op, the reason it is left, or None where
# there is no pattern to see (a slice between the upsample and the cat)
DECODER_CODE = {
    "cat_tuple": "", "cat_negative_dim": "", "concat_upsampled_first": "",
    "concatenate_axis": "", "pad_on_a_shape_branch": "",
    "bicubic": "mode 'bicubic'", "upsampled_used_twice": "used elsewhere", "scale_three": None,
}  # fmt: skip


@pytest.mark.parametrize("name", DECODER_CODE)
def test_decoder_code_as_people_write_it(name, torch_backend):
    """Forms of upsample + cat in a forward: each fuses, or is left with its reason, and the
    model's results are the original's either way."""
    why = DECODER_CODE[name]
    decoder_class = type(name, (_Decoder,), {"forward": _decoder_forwards()[name]})
    torch.manual_seed(0)
    original = _KeywordCalls(lambda up, low, skip: up(low, skip)).eval()  # conv, pool, decoder
    original.up = decoder_class()
    fast = fastunet.accelerate(original)
    for _ in range(2):  # traces, then runs the trace
        counts = compare(original, fast, torch.randn(2, 3, 8, 6))
    rows = [row for row in fastunet.acceleration_report(fast).rows if row.module == "up"]
    upsample_rows = [row for row in rows if "upsample" in row.pattern]
    assert counts[UPCAT] == (1 if why == "" else 0), rows
    if why:
        assert any(row.runs_on == "PyTorch (left)" and why in row.why for row in upsample_rows)


class _ListDecoder(_Decoder):
    def forward(self, pair):
        low, skip = pair
        return F.relu(self.conv(torch.cat([skip, F.interpolate(low, scale_factor=2)], 1)))


def test_a_forward_called_with_a_list_runs_as_written_and_says_so(torch_backend):
    torch.manual_seed(0)
    original = _KeywordCalls(lambda up, low, skip: up([low, skip])).eval()
    original.up = _ListDecoder()
    fast = fastunet.accelerate(original)
    for _ in range(2):
        counts = compare(original, fast, torch.randn(2, 3, 8, 6))
    assert counts[UPCAT] == 0
    (row,) = [row for row in fastunet.acceleration_report(fast).left() if row.module == "up"]
    assert row.pattern == "forward" and "not a tensor" in row.why
    torch._dynamo.reset()
    fresh = fastunet.accelerate(original)  # compiled at its first call: the row is not traced
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), original(x))


def test_value_branch_is_reported(torch_backend):
    fast = fastunet.accelerate(_ValueBranch())
    fast(torch.randn(1, 3, 8, 8))
    (row,) = fastunet.acceleration_report(fast).left()
    assert row.pattern == "forward" and "not traceable" in row.why


class _UpConvBatchNormReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2)
        self.conv, self.bn = nn.Conv2d(7, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, low, skip):
        return F.relu(self.bn(self.conv(torch.cat([skip, self.up(low)], 1))))


REPLACEMENTS = {
    "conv": lambda: nn.Conv2d(7, 3, 3, padding=1),
    "bn": lambda: nn.GroupNorm(1, 3),
    "up": lambda: nn.Upsample(scale_factor=2, mode="bilinear"),
}


@pytest.mark.parametrize("name", REPLACEMENTS)
def test_a_layer_replaced_after_its_trace_computes_as_itself(name, torch_backend):
    """A layer set in place of one that a trace put on an op (`block.conv = nn.Conv2d(...)`):
    the generated code called the op for the old one's kind (`conv.run`, an AttributeError on
    a plain Conv2d; a GroupNorm folded as a BatchNorm; the old upsample's mode). The signature
    is traced again at its next call, with the new layer."""
    torch.manual_seed(0)
    original = _KeywordCalls(lambda up, low, skip: up(low, skip))
    original.up = _UpConvBatchNormReLU()
    fast = fastunet.accelerate(original.eval())  # eval: the BatchNorm2d folds
    x = torch.randn(2, 3, 8, 6)
    for _ in range(2):  # traces, then runs the trace
        counts = compare(original, fast, x)
    assert counts[UPCAT] == 1 and counts[CONV] == 2
    setattr(original.up, name, REPLACEMENTS[name]().eval())
    setattr(fast.up, name, copy.deepcopy(getattr(original.up, name)))
    for _ in range(2):
        counts = compare(original, fast, x)
    assert counts[UPCAT] == 1  # traced again: the decoder's upsample + cat is still on its op
    assert counts[CONV] == (1 if name == "conv" else 2)  # a Conv2d set later is as it is


class _Switches(nn.Module):
    """A forward that branches on attributes, as flags for deep supervision or for returning
    features do: one read by the forward, one by a helper it calls, one a class default."""

    mode = "nearest"

    def __init__(self):
        super().__init__()
        self.down, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)
        self.use_skip, self.scale = True, 1.0

    def skip(self, s):
        return s * self.scale if self.use_skip else torch.zeros_like(s)

    def forward(self, x):
        s = F.relu(self.down(x))
        up = F.interpolate(F.max_pool2d(s, 2), scale_factor=2, mode=self.mode)
        return self.conv(torch.cat([self.skip(s), up], 1))


def test_a_forward_that_branches_on_an_attribute_follows_it(torch_backend):
    """The trace took the branches of the attribute values it saw: after `use_skip = False` the
    traced code kept the skip connection, silently. Scalar attributes its code reads are part of
    the call signature, so a change traces the forward again, and a change back finds its
    trace."""
    torch.manual_seed(0)
    original = _Switches().eval()
    fast = fastunet.accelerate(original)
    assert fast.forward.forward.attributes == ("mode", "scale", "use_skip")
    x = torch.randn(2, 3, 8, 8)
    changes = [("use_skip", False), ("scale", 0.5), ("mode", "bilinear")]
    changes += [(name, getattr(original, name)) for name, _ in reversed(changes)]  # and back
    for name, value in [(None, None), *changes]:
        if name:
            setattr(original, name, value)
            setattr(fast, name, value)
        for _ in range(2):
            counts = compare(original, fast, x)
        assert counts[UPCAT] == 1 and counts[POOL] == 1
    assert len(fast.forward.forward.traced) == 4
    original.scale = fast.scale = torch.tensor(0.5)  # no scalar: no key, runs as written
    compare(original, fast, x)
    (row,) = fastunet.acceleration_report(fast).left()
    assert "no longer None or a scalar" in row.why
    # An attribute the forward sets is no branch: its trace is refused anyway.
    assert fastunet.accelerate(_UntraceablePython("attributes")).forward.forward.attributes == (
        "kind",
    )


def test_training_batch_norm_in_an_eval_model_is_not_folded(torch_backend):
    torch.manual_seed(0)
    original = MilesialStyleUNet(3, 2, 4, 2).eval()
    original.stem[1].train()  # e.g. fine-tuning one BatchNorm
    fast = fastunet.accelerate(original)
    for _ in range(2):
        compare(original, fast, torch.randn(2, 3, 16, 16))


class _UntraceablePython(nn.Module):
    """A decoder whose forward does what its trace would not keep: it draws random numbers
    outside the tensors it computes (noise made from a shape, a coin for stochastic depth), sets
    attributes or updates a buffer, computes part of itself without autograd, updates its input
    in place, or reads a value into Python where an `except` would catch the trace's error."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.calls = kind, 0
        self.frozen = nn.Conv2d(3, 3, 3, padding=1)
        self.conv = nn.Conv2d(7, 3, 3, padding=1)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, low, skip):
        if self.kind == "buffer":
            self.steps += 1
        elif self.kind == "input-in-place":
            skip *= 0.5
        elif self.kind == "caught-value":
            with contextlib.suppress(Exception):  # an empty tensor, say
                skip = skip / float(skip.detach().abs().max())
        elif self.kind == "frozen":
            with torch.no_grad():  # a frozen, pretrained part
                skip = F.relu(self.frozen(skip))
        elif self.kind == "noise" and self.training:
            skip = skip + 0.1 * torch.randn(skip.shape)
        elif self.kind == "layer-drop" and self.training and torch.rand(1).item() < 0.5:
            return skip
        elif self.kind == "attributes":
            self.calls += 1
            self.attention = torch.sigmoid(skip.mean(1, keepdim=True))  # kept to look at
        up = F.interpolate(low, scale_factor=2)
        return F.relu(self.conv(torch.cat([skip, up], 1)))


UNTRACEABLE = ["frozen", "noise", "layer-drop", "attributes", "buffer", "caught-value"]


def _matches_the_original_over_calls(kind: str) -> nn.Module:
    """Six calls of _UntraceablePython(kind) and its accelerated copy: outputs, the generator's
    state, the input (which the forward may update), buffers and which gradients exist agree."""
    torch.manual_seed(0)
    original = _UntraceablePython(kind).train()
    fast = fastunet.accelerate(original)
    low, skip = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 8, 8) * 5
    for seed in range(6):
        outputs, draws, skips = [], [], []
        for model in (original, fast):
            torch.manual_seed(seed)
            model.zero_grad()
            skips.append(skip.clone().requires_grad_(kind != "input-in-place"))
            outputs.append(model(low, skips[-1] * 1 if kind != "input-in-place" else skips[-1]))
            outputs[-1].sum().backward()
            draws.append(torch.rand(1))  # the generator's state after the call
        assert torch.equal(outputs[1], outputs[0]) and torch.equal(draws[1], draws[0]), seed
        assert torch.equal(skips[1], skips[0]) and torch.equal(fast.steps, original.steps)
        pairs = zip(fast.named_parameters(), original.parameters(), strict=True)
        for (name, ours), theirs in pairs:
            assert (ours.grad is None) == (theirs.grad is None), name
    return fast


@pytest.mark.parametrize("kind", UNTRACEABLE)
def test_a_forward_whose_python_a_trace_cannot_keep_runs_as_written(kind, torch_backend):
    """Its trace ran the Python again and kept one outcome: random draws, attribute and buffer
    updates and grad modes then stopped happening, and a value read into Python took the branch
    of the trace's error. The trace is refused (what it drew or set is put back), so every call
    matches the original, gradients, RNG and buffers too."""
    fast = _matches_the_original_over_calls(kind)
    if kind == "attributes":
        assert fast.calls == 6
    (row,) = fastunet.acceleration_report(fast).left()
    assert "runs as written" in row.why


def test_an_argument_updated_in_place_is_updated_in_place_by_the_traced_code(torch_backend):
    """`skip *= 0.5` is traced as operator.imul, which the generated code runs on the caller's
    tensor as the forward did (fx alone would run `skip = skip * 0.5`, leaving it unchanged)."""
    fast = _matches_the_original_over_calls("input-in-place")
    rows = fastunet.acceleration_report(fast).rows
    assert not fastunet.acceleration_report(fast).left()
    assert any(row.runs_on == UPCAT for row in rows), rows


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, stride 1: `out += identity` after the second conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _ResidualUNet(nn.Module):
    """A ResNet-encoder UNet in miniature (smp's with a resnet encoder, say)."""

    def __init__(self):
        super().__init__()
        self.enc1, self.enc2, self.dec = _BasicBlock(3, 4), _BasicBlock(4, 8), _BasicBlock(12, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        skip = self.enc1(x)
        low = self.enc2(F.max_pool2d(skip, 2))
        return self.head(self.dec(torch.cat([skip, F.interpolate(low, scale_factor=2)], 1)))


def test_residual_blocks_fuse_their_chains_and_match(torch_backend):
    """A block's `out += identity` failed its trace, so its conv + BatchNorm + ReLU were not
    fused: in eval, every BatchNorm ran. Now each folds, in train and eval the model matches."""
    torch.manual_seed(0)
    original = _ResidualUNet()
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 16, 16)
    for training in (True, False):
        original.train(training)
        fast.train(training)
        for _ in range(2):  # traces, then runs the traced code
            counts = compare(original, fast, x)
        assert (counts[CONV], counts[POOL], counts[UPCAT]) == (10, 1, 1)
    assert sum(n for op, n in counts.items() if "batch_norm" in op) == 0  # eval: all folded
    report = fastunet.acceleration_report(fast)
    assert not report.left()
    for pattern in ("conv2d + batch_norm2d + relu", "conv2d + batch_norm2d"):
        blocks = [row.module for row in report.rows if row.pattern == pattern]
        assert sorted(blocks) == ["dec", "enc1", "enc2"], pattern


class _LeakyResidual(nn.Module):
    def __init__(self, through_a_view: bool):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.LeakyReLU(0.1)
        self.through_a_view = through_a_view

    def forward(self, x):
        out = self.act(self.conv(x))
        changed = out[:, :2] if self.through_a_view else out
        changed += x[:, : changed.shape[1]]
        return F.relu(out)  # a pattern function: the forward is traced


@pytest.mark.parametrize("through_a_view", [False, True], ids=["output", "view"])
def test_a_leaky_relu_conv_before_an_in_place_change_is_left(through_a_view, torch_backend):
    """The op saves its output for the backward where PyTorch's LeakyReLU saves its input: fused,
    `out += x` after it, or on a view of it, would make the backward raise autograd's in-place
    error. (Such forwards failed their trace before `+=` was traced.)"""
    torch.manual_seed(0)
    original = _LeakyResidual(through_a_view)
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)  # no layout copy between
    for _ in range(2):
        compare(original, fast, x)
    (row,) = fastunet.acceleration_report(fast).left()
    assert row.pattern == "conv2d + leaky_relu(0.1)" and "changes in place after it" in row.why


class _LeakyBlockResidual(nn.Module):
    """A Sequential conv [+ BatchNorm2d] + LeakyReLU whose output its caller changes in place."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        norm = [nn.BatchNorm2d(3)] if batch_norm else []
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), *norm, nn.LeakyReLU(0.1))

    def forward(self, x):
        out = self.block(x)
        out += x
        return out


@pytest.mark.parametrize("batch_norm", [False, True], ids=["conv", "conv-bn"])
def test_a_sequential_leaky_relu_output_may_change_in_place(batch_norm, backend):
    """PyTorch's LeakyReLU (not in place) saves its input, so its caller may change its output in
    place (`out += identity`) and still train; the fused op saves its output. Where autograd
    records, the LeakyReLU runs after the op; without autograd it stays in the op."""
    torch.manual_seed(0)
    original = _LeakyBlockResidual(batch_norm).eval()  # eval: the BatchNorm2d folds
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 8, 8, device=backend_device(backend))
    original, fast = original.to(x.device), fast.to(x.device)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        counts = compare(original, fast, x.to(memory_format=memory_format))
        assert counts[CONV] == 1 and counts["aten::leaky_relu"] == 1
    counter = OpCounter()
    with torch.no_grad():
        with counter:
            ours = fast(x)
        assert_close("output", ours, original(x), original.double()(x.double()), 1e-7)
    assert counter.counts[CONV] == 1 and counter.counts["aten::leaky_relu"] == 0


class _InPlaceBetween(nn.Module):
    """An in-place change, between a pattern's parts, of what its first part read: the fused op
    runs where the pattern's last part was."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x, skip):
        if self.where == "conv":
            h = self.bn(self.conv(x))
            x = x.relu_()
            return F.relu(h) + x
        up = F.interpolate(x, scale_factor=2.0)
        x.mul_(0.5)
        return torch.cat([skip, up], 1)


@pytest.mark.parametrize("where", ["conv", "upsample"])
def test_a_pattern_with_an_in_place_change_between_its_parts_is_left(where, torch_backend):
    torch.manual_seed(0)
    original = _InPlaceBetween(where).eval()
    fast = fastunet.accelerate(original)
    for _ in range(2):
        x, skip = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            expected, got = original(x.clone(), skip), fast(x.clone(), skip)
        assert relative_error(got, expected) < 1e-6
    (row,) = fastunet.acceleration_report(fast).left()
    assert "in place between its parts" in row.why


class _CastsToItsSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.conv = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        skip = self.down(x)  # in autocast's dtype
        up = F.interpolate(F.max_pool2d(skip, 2).float(), scale_factor=2).to(skip.dtype)
        return F.relu(self.conv(torch.cat([skip, up], 1)))


def test_a_traced_forward_is_traced_again_under_another_autocast_dtype(torch_backend):
    """A layer's output dtype is a constant of the traced code, so the autocast dtype is part of
    the signature, not only whether autocast is on."""
    torch.manual_seed(0)
    original = _CastsToItsSkip()
    fast = fastunet.accelerate(original)
    x = torch.randn(1, 3, 8, 8)
    for dtype in (torch.bfloat16, torch.bfloat16, torch.float16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            expected, got = original(x), fast(x)
        assert got.dtype == expected.dtype == dtype
        assert relative_error(got.float(), expected.float()) < 1e-2


class _Swish(torch.autograd.Function):
    """A memory-saving activation, as efficientnet_pytorch writes one."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class _CheckpointedEncoder(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.encoder = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.decoder = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        if self.kind == "function":
            skip = _Swish.apply(self.encoder(x))
        elif self.kind == "subclass":  # as MONAI's MetaTensor(h) wraps a tensor
            skip = self.encoder(x)
            self.logged = torch.Tensor._make_subclass(torch.Tensor, skip.detach())
        elif self.kind == "vmap":
            skip = torch.vmap(lambda t: t * 2)(self.encoder(x))
        else:
            reentrant = self.kind == "reentrant"
            skip = torch.utils.checkpoint.checkpoint(self.encoder, x, use_reentrant=reentrant)
        up = F.interpolate(F.max_pool2d(skip, 2), scale_factor=2.0)
        return self.decoder(torch.cat([skip, up], 1))


@pytest.mark.parametrize("kind", ["checkpoint", "reentrant", "function", "subclass", "vmap"])
def test_a_forward_that_hands_a_tensor_to_cpp_runs_as_written(kind, torch_backend):
    """A checkpoint, a custom autograd.Function, a tensor subclass's constructor or vmap handed
    C++ a traced value, which said it was a tensor, and the process died (segmentation fault)
    at the first call: such a forward now runs as written."""
    torch.manual_seed(0)
    original = _CheckpointedEncoder(kind)
    fast = fastunet.accelerate(original)
    for _ in range(2):
        compare(original, fast, torch.randn(1, 2, 8, 8))
    (row,) = fastunet.acceleration_report(fast).left()
    assert "runs as written" in row.why


_Features = collections.namedtuple("_Features", ["skip", "deep"])


class _NamedTupleEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        skip = F.relu(self.conv(x))
        return _Features(skip=skip, deep=F.max_pool2d(skip, 2))


class _NamedTupleUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = _NamedTupleEncoder(), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        features = self.encoder(x)
        up = F.interpolate(features.deep, scale_factor=2.0)
        return self.decoder(torch.cat([features.skip, up], 1))


def test_a_layer_that_returns_a_namedtuple(torch_backend):
    """The first call records each layer's output, namedtuples too (it raised TypeError)."""
    torch.manual_seed(0)
    original = _NamedTupleUNet()
    fast = fastunet.accelerate(original)
    for _ in range(2):
        counts = compare(original, fast, torch.randn(1, 3, 8, 8))
    assert counts[UPCAT] == 1


class _WaitsForAnotherThread(nn.Module):
    """A decoder whose forward waits for `elsewhere`, which runs models in another thread, as a
    serving thread may while a new input shape is traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(7, 3, 3, padding=1)
        self.elsewhere: Callable[[], None] = lambda: None

    def forward(self, low, skip):
        self.elsewhere()
        up = F.interpolate(low, scale_factor=2)
        return F.relu(self.conv(torch.cat([skip, up], 1)))


def test_models_run_in_another_thread_during_a_trace_run_as_themselves(torch_backend):
    """fx's trace patches Module.__call__ and __getattr__ for the whole process. A model run in
    another thread while a new shape was traced, even one never accelerated, raised NameError
    or got fx's Proxies; and the accelerated model's own layer, called there, spoilt the
    records of the call and so the trace: the pattern was left."""
    torch.manual_seed(0)
    other = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    original = _WaitsForAnotherThread()
    fast = fastunet.accelerate(original)
    x = torch.randn(1, 7, 6, 6)
    with torch.no_grad():
        expected = (other(x[:, :3]), original.conv(x))
    results = []

    def in_another_thread():
        def run():
            try:
                with torch.no_grad():
                    results.append((other(x[:, :3]), fast.conv(x)))
            except Exception as error:
                results.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    fast.elsewhere = in_another_thread
    low, skip = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 8, 8)
    for _ in range(2):
        torch.testing.assert_close(fast(low, skip), original(low, skip))
    assert len(results) == 2  # the first call and its trace (the traced code has no call)
    for result in results:
        assert not isinstance(result, Exception), repr(result)
        assert all(map(torch.equal, result, expected))
    assert not fastunet.acceleration_report(fast).left()


class _SequentialAsContainer(nn.Module):
    """Calls its Sequentials' layers one by one, as diffusion UNets add a time embedding after a
    block's conv, and slices one as perceptual losses take a VGG's features before a ReLU."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.embedding = nn.Linear(2, 4)
        self.features = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        )

    def forward(self, x, t):
        h = self.block[0](x) + self.embedding(t)[:, :, None, None]
        h = self.block[2](self.block[1](h))
        return self.features[:3](h) + self.features(h)


@pytest.mark.parametrize("training", [False, True])
def test_a_sequential_used_as_a_container_runs_each_layer_as_itself(training, torch_backend):
    """A chain folds only where its Sequential's own forward runs it: a layer called on its own
    computes itself (the conv alone, not conv + BatchNorm + ReLU), as does a slice."""
    torch.manual_seed(0)
    original = _SequentialAsContainer().train(training)
    fast = fastunet.accelerate(original)
    x, t = torch.randn(2, 3, 8, 8), torch.randn(2, 2)
    for _ in range(2):
        expected, got = original(x, t), fast(x, t)
        assert relative_error(got, expected) < 1e-5
        if training:
            assert torch.equal(fast.block[1].running_mean, original.block[1].running_mean)
    counter = OpCounter()
    with counter:
        fast.block(x)  # the whole Sequential: its chain folds
    batch_norms = sum(n for name, n in counter.counts.items() if "batch_norm" in name)
    assert counter.counts[CONV] == 1 and batch_norms == int(training)


@pytest.mark.parametrize("scope", ["module", "global"])
def test_a_hook_registered_later_sees_each_layers_own_output(scope, torch_backend):
    """A hook on a layer that an op took over (the Sequential's conv, BatchNorm and ReLU; the
    decoder's nn.Upsample, after its first call traced it) sees what it sees in the original:
    those layers run as themselves while it is there, and fuse again once it is removed. It saw
    the fused output, or was never called."""
    torch.manual_seed(0)
    original = MilesialStyleUNet(3, 2, 4, 2).eval()
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 16, 16)
    fast(x)  # traces the decoders
    layers = ["stem.0", "stem.1", "stem.2", "ups.0.up"]
    seen = {}

    def watch(model_name, model):
        """Hooks that keep each layer's first output under (model_name, the layer's path)."""
        paths = {module: path for path, module in model.named_modules()}

        def hook(module, inputs, output):
            seen.setdefault((model_name, paths.get(module)), output)

        if scope == "global":  # for every module, while this model runs
            return [nn.modules.module.register_module_forward_hook(hook)]
        return [model.get_submodule(layer).register_forward_hook(hook) for layer in layers]

    handles = []
    for name, model in (("original", original), ("fast", fast)):
        handles += watch(name, model)
        out = model(x)
        if scope == "global":
            handles.pop().remove()
    assert relative_error(out, original(x)) < 1e-5
    for layer in layers:
        assert relative_error(seen["fast", layer], seen["original", layer]) < 1e-5, layer
    for handle in handles:
        handle.remove()
    counter = OpCounter()
    with counter:
        fast(x)
    assert counter.counts[UPCAT] == 2 and counter.counts["aten::batch_norm"] == 0


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]], ids=lambda case: case.name)
def test_on_the_cpu_the_model_runs_as_written_bit_for_bit(case, monkeypatch):
    """Under the CPU rule every layer runs PyTorch's path, so the accelerated model makes the
    same calls as the original, in eval (BatchNorm is not folded: folding on every call cost more
    than the BatchNorm pass) and in training. The rule is checked once a forward, not by each
    layer (a few microseconds each: 0.91x the original's speed for a small UNet's forward)."""
    monkeypatch.setattr(_choice, "INTERPRET", False)
    monkeypatch.setattr(modules, "fold_batch_norm", None)  # never called
    rule_checks = []

    def counted_rule(x):
        rule_checks.append(x.shape)
        return _choice.runs_pytorch_by_rule(x)

    monkeypatch.setattr(modules, "runs_pytorch_by_rule", counted_rule)
    torch.manual_seed(0)
    original = case.build()
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, case.size, case.size)
    for training in (False, True):
        original.train(training)
        fast.train(training)
        # The first call with these shapes traces; the second runs the trace.
        for _ in range(2):
            rule_checks.clear()
            ours, theirs = step(fast, x), step(original, x)
            assert rule_checks == [x.shape]
            for name, value in ours.items():
                assert torch.equal(value, theirs[name]), f"training={training}: {name}"
        with torch.no_grad():  # the bench's layer count: every layer asks, or says it ran
            fast(x), original(x)  # without autograd, traced again (and BatchNorms alike)
            with _choice.recording() as calls:
                assert torch.equal(fast(x), original(x))
        assert _choice.summarize(calls) == {"fastunet": 0, "torch": sum(case.ops.values())}
    assert not _choice.inside_pytorch_by_rule()


def test_on_the_cpu_a_layer_called_alone_runs_as_written(monkeypatch):
    """A replaced layer called outside the accelerated model's forward checks the rule itself."""
    monkeypatch.setattr(_choice, "INTERPRET", False)
    monkeypatch.setattr(modules, "fold_batch_norm", None)
    torch.manual_seed(0)
    original = MilesialStyleUNet(3, 2, 4, 2).eval()
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fast.stem(x), original.stem(x))
    features = original.stem(x)
    assert torch.equal(fast.downs[0](features), original.downs[0](features))


def test_on_the_cpu_a_traced_forward_runs_its_code_as_written(monkeypatch):
    """Under the CPU rule every layer of a traced forward takes PyTorch's path, so the code as
    written runs, not the rewritten graph and its per-layer calls (about 10 us a decoder)."""
    monkeypatch.setattr(_choice, "INTERPRET", False)
    torch.manual_seed(0)
    original = MilesialStyleUNet(3, 2, 2, 1).eval()
    fast = fastunet.accelerate(copy.deepcopy(original))
    x = torch.randn(1, 3, 8, 8)
    fast(x)  # the first call with these shapes runs as written, and traces
    assert fast.ups[0].forward.traced  # the graph, for recorded calls and a forced backend
    up_class = type(fast.ups[0])
    as_written = up_class.forward
    calls = []
    monkeypatch.setattr(
        up_class, "forward", lambda self, *a: calls.append(1) or as_written(self, *a)
    )
    assert torch.equal(fast(x), original(x))
    assert len(calls) == 2  # fast's decoder as written, then original's
    with _choice.recording():  # a recorded call runs the graph, whose layers it counts
        fast(x)
    assert len(calls) == 2


def test_an_error_in_the_forward_leaves_no_rule_behind(monkeypatch):
    monkeypatch.setattr(_choice, "INTERPRET", False)
    fast = fastunet.accelerate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(RuntimeError, match="channels"):
        fast(torch.randn(1, 5, 8, 8))
    assert not _choice.inside_pytorch_by_rule()
    monkeypatch.setenv("FASTUNET_BACKEND", "torch")  # the layers ask again, and run the op
    counter = OpCounter()
    with counter:
        fast(torch.randn(1, 3, 8, 8))
    assert counter.counts[CONV] == 1


def test_unbatched_input_and_negative_slope(torch_backend):
    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(-0.5), nn.Conv2d(4, 4, 1), nn.ReLU()
    )
    fast = fastunet.accelerate(original)
    x = torch.randn(3, 8, 8)  # (C, H, W): nn.Conv2d takes it, the op does not
    assert torch.allclose(fast(x), original(x), rtol=1e-5, atol=1e-6)
    rows = {row.module: row for row in fastunet.acceleration_report(fast).rows}
    assert "negative slope" in rows["0"].why
    assert rows["2"].pattern == "conv2d + relu"


def test_errors():
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        fastunet.accelerate(lambda x: x)
    fast = fastunet.accelerate(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="accelerated already"):
        fastunet.accelerate(fast)
    with pytest.raises(ValueError, match=r"not made by fastunet\.accelerate"):
        fastunet.acceleration_report(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------- the kernels themselves


class _LeakyDecoder(nn.Module):
    """Conv-BN-LeakyReLU chains and a concat with the upsampled tensor first."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.MaxPool2d(2)
        )
        self.up = nn.Sequential(nn.Conv2d(7, 4, 3, padding=1), nn.LeakyReLU(0.2))

    def forward(self, x):
        low = F.interpolate(self.down(x), scale_factor=2, mode="bilinear")
        return self.up(torch.cat([low, x], 1))


@pytest.mark.parametrize(
    "build,ops",
    [
        (lambda: MilesialStyleUNet(3, 2, 2, 1), {CONV: 7, POOL: 1, UPCAT: 1}),
        (_LeakyDecoder, {CONV: 2, POOL: 1, UPCAT: 1}),
    ],
    ids=["milesial", "leaky-upsampled-first"],
)
def test_kernels(build, ops, kernels_backend):
    """The same comparison with fastunet's kernels running (the interpreter on a CPU)."""
    torch.manual_seed(0)
    original = build().to(KERNEL_DEVICE).eval()
    fast = fastunet.accelerate(original)
    x = torch.randn(1, 3, 8, 8, device=KERNEL_DEVICE)
    for _ in range(2):
        counts = compare(original, fast, x)
    assert {op: counts[op] for op in (CONV, POOL, UPCAT)} == ops
    copy.deepcopy(fast)(x)  # an accelerated model copies, traces and all


@st.composite
def drawn_models(draw):
    """(a UNet in one of the styles above, with drawn widths and depth; an input for it)."""
    style = draw(st.sampled_from(["milesial-bilinear", "milesial-transposed", "smp",
                                  "reference-nearest", "reference-bilinear"]))  # fmt: skip
    in_channels, depth = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    base = draw(st.integers(2, 4))
    if style.startswith("milesial"):
        model = MilesialStyleUNet(in_channels, 2, base, depth, style.endswith("bilinear"))
        sizes = st.integers(2**depth, 2**depth + 7)  # milesial pads odd sizes back up
    elif style == "smp":
        widths = tuple(base * 2**i for i in range(depth + 1))
        model = SmpStyleUNet(in_channels, 2, widths, tuple(reversed(widths)))
        sizes = st.integers(1, 3).map(lambda k: k * 2 ** (depth + 1))  # its cats need exact 2x
    else:
        mode = style.removeprefix("reference-")
        align = mode == "bilinear" and draw(st.booleans())
        model = fastunet.ReferenceUNet(in_channels, 2, base, depth, mode, align)
        sizes = st.integers(2**depth, 2**depth + 7)
    batch = draw(st.integers(1, 2))
    x = torch.randn(batch, in_channels, draw(sizes), draw(sizes), generator=torch.Generator()
                    .manual_seed(draw(st.integers(0, 2**16))))  # fmt: skip
    layout = draw(INPUT_LAYOUTS)
    if draw(st.booleans()):  # a convolution computes channels_last if its weight is
        model = model.to(memory_format=torch.channels_last)
    return style, model, in_layout(x, layout)


DRAWN = drawn(40)


@DRAWN
@given(case=drawn_models(), training=st.booleans())
def test_drawn_models_match_the_original(case, training, torch_backend):
    """Any width, depth, input channel count (one too), size, input and weight layout, on
    fastunet's ops (the torch composite inside them); the output in the original's layout."""
    _, original, x = case
    assume(not training or x.shape[0] > 1)  # BatchNorm trains on more than one value
    torch.manual_seed(0)
    original.train(training)
    fast = fastunet.accelerate(copy.deepcopy(original))
    for _ in range(2):  # the first call with these shapes traces; the second runs the trace
        compare(original, fast, x, count=False)
    with torch.no_grad():
        assert fast(x).stride() == original(x).stride()


@DRAWN
@given(case=drawn_models(), training=st.booleans())
def test_on_the_cpu_drawn_models_run_as_written_bit_for_bit(case, training, monkeypatch):
    style, original, x = case
    assume(not training or x.shape[0] > 1)
    monkeypatch.setattr(_choice, "INTERPRET", False)
    original.train(training)
    fast = fastunet.accelerate(copy.deepcopy(original))
    for _ in range(2):
        ours, theirs = step(fast, x), step(original, x)
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), f"{style}: {name}"


def test_a_replaced_decoder_hands_on_the_layout_torch_cat_would(torch_backend):
    """cat([skip, upsample(x)]) is channels_last only where both are: at a 1x1 bottom level x's
    strides read as NCHW, so a channels_last input's last decoder conv computes NCHW in the
    original, and must in the accelerated model (hypothesis found it: the bits differed)."""
    torch.manual_seed(0)
    original = MilesialStyleUNet(2, 2, 2, 1).eval()
    fast = fastunet.accelerate(copy.deepcopy(original))
    x = torch.randn(1, 2, 2, 2).contiguous(memory_format=torch.channels_last)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].stride()

        return hook

    for name, model in (("original", original), ("fast", fast)):
        handle = model.ups[0].conv[0].register_forward_pre_hook(record(name))
        with torch.no_grad():
            model(x), model(x)  # the first call traces, the second runs the trace
        handle.remove()
    assert seen["fast"] == seen["original"] == (16, 4, 2, 1)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags warns
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("library", ["on", "off"], ids=["cudnn-or-onednn-on", "off"])
@pytest.mark.parametrize(
    "input_layout", _choice.LAYOUTS.values(), ids=[f"x-{k}" for k in _choice.LAYOUTS]
)
@pytest.mark.parametrize(
    "weight_layout", _choice.LAYOUTS.values(), ids=[f"w-{k}" for k in _choice.LAYOUTS]
)
def test_a_replaced_conv_hands_on_the_layout_pytorchs_would(
    kernels_backend, device, dtype, library, input_layout, weight_layout
):
    """On the CPU a convolution computes channels_last where its input or weight is, with
    oneDNN or without; on CUDA only where cuDNN runs it (not float64, not with cuDNN off)."""
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).to(device, dtype)
    original = original.to(memory_format=weight_layout)
    fast = fastunet.accelerate(original)
    x = torch.randn(2, 3, 6, 5, device=device, dtype=dtype).contiguous(memory_format=input_layout)
    flags = torch.backends.cudnn if device == "cuda" else torch.backends.mkldnn
    # flags() turns TF32 on unless told; the kernels follow cuDNN's setting, PyTorch's fallback
    # without cuDNN does not.
    with flags.flags(enabled=library == "on", allow_tf32=False), torch.no_grad():
        expected, out = original(x), fast(x)
    torch.testing.assert_close(out, expected)
    assert out.stride() == expected.stride()


class ReluInForward(nn.Module):
    """A conv + activation written in a forward (a traced pattern), in place or not."""

    def __init__(self, conv: nn.Conv2d, in_place: bool):
        super().__init__()
        self.conv, self.in_place = conv, in_place

    def forward(self, x):
        return F.relu(self.conv(x), inplace=self.in_place)


@pytest.mark.parametrize(
    "where, activation",
    [("sequential", "none"), ("sequential", "relu"), ("sequential", "relu-in-place"),
     ("sequential", "leaky-relu"), ("sequential", "batch-norm"),
     ("sequential", "batch-norm-relu-in-place"), ("forward", "relu"),
     ("forward", "relu-in-place")],
)  # fmt: skip
@pytest.mark.parametrize(
    "shape, out_channels",
    [((2, 8, 1, 1), 6), ((2, 8, 2, 2), 6), ((2, 3, 4, 5), 1), ((2, 1, 4, 5), 1)],
    ids=["1x1-image", "pooled-to-1x1", "one-output-channel", "one-channel"],
)  # fmt: skip
def test_where_both_layouts_fit_the_output_has_the_originals_strides(
    backend, where, activation, shape, out_channels
):
    """At a 1x1 image or one channel, NCHW and channels_last strides describe the same memory,
    and the next layer reads the layout from the strides: an upsample of a 1x1 image then
    computes the other layout, and a dropout after it draws another mask. The kernels' output
    had channels_last strides whatever PyTorch's had; PyTorch's new-tensor activations (and
    BatchNorm on the CPU) give NCHW ones there, its in-place ones keep the convolution's."""
    conv = nn.Conv2d(shape[1], out_channels, 3, padding=1)
    if where == "forward":
        original = ReluInForward(conv, in_place=activation == "relu-in-place")
    else:
        layers = {"none": [], "relu": [nn.ReLU()], "relu-in-place": [nn.ReLU(inplace=True)],
                  "leaky-relu": [nn.LeakyReLU(0.1)], "batch-norm": [nn.BatchNorm2d(out_channels)],
                  "batch-norm-relu-in-place": [nn.BatchNorm2d(out_channels),
                                               nn.ReLU(inplace=True)]}[activation]  # fmt: skip
        original = nn.Sequential(conv, *layers).eval()  # a BatchNorm2d folds in eval
    device = backend_device(backend)
    original = original.to(device)
    fast = fastunet.accelerate(original)
    for layout in _choice.LAYOUTS.values():
        x = torch.randn(shape, device=device).contiguous(memory_format=layout)
        if shape[2:] == (2, 2):
            x = F.max_pool2d(x, 2)  # a 1x1 image with channels_last strides
        with torch.no_grad():
            expected, out = original(x), fast(x)
        torch.testing.assert_close(out, expected)
        assert out.stride() == expected.stride(), (layout, x.stride())


@pytest.mark.gpu
def test_a_replaced_conv_on_cuda_compiles_fullgraph_with_its_layout_rule(kernels_backend):
    """The rule's cuDNN checks are read where torch.compile can trace them."""
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).cuda()
    original = original.to(memory_format=torch.channels_last)
    fast = fastunet.accelerate(original)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 5, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, out = original(x), compiled(x)
    torch.testing.assert_close(out, expected)
    assert out.stride() == expected.stride()


def test_the_conv_layout_rule_on_cuda_tensors_without_a_gpu(monkeypatch):
    """The rule's CUDA branch, on fake CUDA tensors (the test above checks it against PyTorch's
    convolution on a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(kernels, "CUDNN_BUILT", True)

    def empty(*shape, layout=torch.contiguous_format, dtype=torch.float32):
        return torch.empty(shape, device="cuda", dtype=dtype, memory_format=layout)

    nhwc = torch.channels_last
    with FakeTensorMode():
        x, x_nhwc, weight = empty(2, 3, 6, 5), empty(2, 3, 6, 5, layout=nhwc), empty(4, 3, 3, 3)
        assert modules.conv_layout(x_nhwc, weight) is nhwc
        assert modules.conv_layout(x, weight) is torch.contiguous_format
        assert modules.conv_layout(x, empty(4, 3, 3, 3, layout=nhwc)) is nhwc
        x_double = empty(2, 3, 6, 5, layout=nhwc, dtype=torch.float64)
        assert modules.conv_layout(x_double, weight) is torch.contiguous_format
        with torch.backends.cudnn.flags(enabled=False):
            assert modules.conv_layout(x_nhwc, weight) is torch.contiguous_format
        monkeypatch.setattr(kernels, "CUDNN_BUILT", False)
        assert modules.conv_layout(x_nhwc, weight) is torch.contiguous_format
