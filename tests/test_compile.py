"""The whole UNet under torch.compile(fullgraph=True), forward and backward; torch.export; and
TorchScript's refusal."""

import io

import pytest
import torch
from helpers import KERNEL_DEVICE

import fastunet
from fastunet import ReferenceUNet, UNet
from fastunet.bench.parity import relative_error
from fastunet.bench.styles import MilesialStyleUNet


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_unet_compiles_fullgraph_forward_and_backward(compiler, kernels_backend):
    torch._dynamo.reset()
    reference = ReferenceUNet(3, 2, 4, 2, upsample="bilinear").to(KERNEL_DEVICE)
    eager = UNet.from_reference(reference)
    compiled_model = UNet.from_reference(reference)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 12, 10, device=KERNEL_DEVICE)
    out_eager, out = eager(x), compiled(x)
    assert relative_error(out, out_eager) <= 1e-5
    grad = torch.randn_like(out)
    out_eager.backward(grad)
    out.backward(grad)
    for (name, p), p_eager in zip(
        compiled_model.named_parameters(), eager.parameters(), strict=True
    ):
        assert relative_error(p.grad, p_eager.grad) <= 1e-5, name


def test_unet_exports_saves_and_loads(torch_backend):
    """torch.export's program of UNet, saved and loaded, computes ReferenceUNet's output on
    fastunet's ops (loading needs fastunet imported: the ops are its custom ops)."""
    reference = ReferenceUNet(3, 2, 4, 2, upsample="bilinear").eval()
    x = torch.randn(2, 3, 12, 10)
    exported = torch.export.export(UNet.from_reference(reference), (x,))
    saved = io.BytesIO()
    torch.export.save(exported, saved)
    saved.seek(0)
    with torch.no_grad():
        assert relative_error(torch.export.load(saved).module()(x), reference(x)) <= 1e-5
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {"fastunet.conv2d_relu.default", "fastunet.max_pool2d_with_argmax.default"} <= targets


@pytest.mark.parametrize(
    "make, layer",
    [
        (lambda: UNet(3, 2, 4, 2), "UNet"),
        (lambda: torch.nn.Sequential(fastunet.nn.Conv2dReLU(3, 4, 3)), "Conv2dReLU"),
        (lambda: fastunet.nn.UpsampleConcat(), "UpsampleConcat"),
        (lambda: torch.nn.Sequential(torch.nn.ReLU(), fastunet.nn.MaxPool2d()), "MaxPool2d"),
        (lambda: fastunet.accelerate(MilesialStyleUNet(3, 2, 4)), "FusedConv2d"),
        (lambda: fastunet.accelerate(torch.nn.Sequential(torch.nn.MaxPool2d(2))),
         "AcceleratedMaxPool2d"),
    ],
    ids=["unet", "conv2d-relu", "upsample-concat", "max-pool", "accelerated", "accelerated-pool"],
)  # fmt: skip
def test_torchscript_refuses_fastunets_layers_and_says_what_works(make, layer):
    """TorchScript cannot compile the layers' Python; its own error pointed into fastunet's code
    (or, for an accelerated model, was an AttributeError on a forward's __globals__)."""
    with pytest.raises(TypeError, match=f"torch.jit.script: {layer} is one of fastunet's layers"):
        torch.jit.script(make())


def test_the_torchscript_way_the_error_names_works():
    """torch.jit.trace of UNet.to_reference() gives TorchScript without fastunet's ops, which
    follows the input's shape."""
    fast = UNet(3, 2, 4, 2).eval()
    with pytest.warns(torch.jit.TracerWarning):  # check_input's Python ints
        traced = torch.jit.trace(fast.to_reference(), torch.randn(2, 3, 16, 16))
    assert not [node for node in traced.inlined_graph.nodes() if "fastunet" in node.kind()]
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        assert relative_error(traced(x), fast(x)) <= 1e-5


@pytest.mark.parametrize("path", ["cpu-rule", "torch-composite"])
def test_make_fx_traces_symbolic_shapes(monkeypatch, path):
    """make_fx's symbolic tracing (AOTAutograd's, without Dynamo) hands sizes as symbols, which a
    choice or a traced decoder cannot be keyed by: it raised "unhashable type: SymInt". Traced
    like torch.compile, the graph then runs other shapes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastunet.ops import _choice

    if path == "cpu-rule":
        monkeypatch.setattr(_choice, "INTERPRET", False)  # as outside this suite
    else:
        monkeypatch.setenv("FASTUNET_BACKEND", "torch")
    torch.manual_seed(0)
    reference = ReferenceUNet(2, 2, 4, 2)
    milesial = MilesialStyleUNet(2, 2, 4, 2).eval()
    for original, fast in ((reference, UNet.from_reference(reference)),
                           (milesial, fastunet.accelerate(milesial))):  # fmt: skip
        params = {**dict(fast.named_parameters()), **dict(fast.named_buffers())}
        graph = make_fx(_functional(fast), tracing_mode="symbolic")(torch.randn(2, 2, 8, 8), params)
        x = torch.randn(3, 2, 12, 16)
        assert relative_error(graph(x, params), original(x)) <= 1e-5


def _functional(model):
    def run(x, params):
        return torch.func.functional_call(model, params, (x,))

    return run
