"""UNet against ReferenceUNet on the same weights: forward, every gradient, layouts, bad input."""

import pytest
import torch
from helpers import (
    INPUT_LAYOUTS,
    KERNEL_DEVICE,
    UNET_AXES,
    UPSAMPLE_MODES,
    assert_same_bits,
    backend_device,
    drawn,
    in_layout,
    unet_size,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from fastunet import ReferenceUNet, UNet
from fastunet.bench.parity import relative_error
from fastunet.ops import _choice

FP32_TOLERANCE = 1e-5


def make_pair(depth=2, base_channels=4, in_channels=3, num_classes=2, upsample="nearest",
              align_corners=False, dtype=torch.float32):  # fmt: skip
    reference = ReferenceUNet(
        in_channels, num_classes, base_channels, depth, upsample, align_corners
    )
    reference = reference.to(dtype)
    return reference, UNet.from_reference(reference)


def forward_backward(model, x, grad_out=None):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, x.grad, grads, grad_out


def assert_same_results(reference, fast, x, tolerance=FP32_TOLERANCE):
    out_ref, grad_x_ref, grads_ref, grad_out = forward_backward(reference, x)
    out, grad_x, grads, _ = forward_backward(fast, x, grad_out)
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype
    assert relative_error(out, out_ref) <= tolerance
    assert relative_error(grad_x, grad_x_ref) <= tolerance
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert relative_error(grad, grads_ref[name]) <= tolerance, name


CASES = [
    # (batch, in_channels, H, W, depth, base_channels, upsample, align_corners)
    (2, 3, 16, 16, 2, 4, "nearest", False),
    (1, 3, 17, 23, 2, 4, "nearest", False),
    (1, 1, 9, 12, 3, 3, "bilinear", False),
    (2, 3, 19, 16, 1, 5, "bilinear", True),
    (1, 2, 33, 35, 4, 2, "nearest", False),
    (1, 3, 16, 31, 4, 2, "bilinear", False),
    (1, 3, 12, 10, 2, 3, "nearest", True),  # ReferenceUNet ignores align_corners for nearest
]


@pytest.mark.parametrize("batch,cin,h,w,depth,base,upsample,align", CASES)
def test_unet_matches_reference_fp32(torch_backend, batch, cin, h, w, depth, base, upsample, align):
    reference, fast = make_pair(depth, base, cin, 3, upsample, align)
    x = torch.randn(batch, cin, h, w)
    assert_same_results(reference, fast, x)


@pytest.mark.slow
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_unet_on_kernels_matches_reference(kernels_backend, upsample):
    """The whole model through the kernels (the interpreter on CPU), forward and backward."""
    reference, fast = make_pair(depth=2, base_channels=4, upsample=upsample)
    x = torch.randn(1, 3, 12, 10, device=KERNEL_DEVICE)
    assert_same_results(reference.to(KERNEL_DEVICE), fast.to(KERNEL_DEVICE), x)


def test_state_dict_round_trip_is_strict_and_exact():
    reference, _ = make_pair(depth=3)
    fast = UNet(3, 2, 4, 3)
    fast.load_state_dict(reference.state_dict(), strict=True)
    back = ReferenceUNet(3, 2, 4, 3)
    back.load_state_dict(fast.state_dict(), strict=True)
    assert list(fast.state_dict()) == list(reference.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(fast.state_dict()[name], value)
        assert torch.equal(back.state_dict()[name], value)


def test_from_reference_and_to_reference_keep_weights_dtype_and_mode():
    reference, _ = make_pair(depth=2, upsample="bilinear", align_corners=True, dtype=torch.float64)
    reference.eval()
    fast = UNet.from_reference(reference)
    assert isinstance(fast, UNet) and not fast.training
    assert fast.config == reference.config
    assert fast.head.weight.dtype == torch.float64
    back = fast.to_reference()
    assert type(back) is ReferenceUNet and not back.training
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)


def test_fresh_unet_has_reference_initialisation_and_names():
    torch.manual_seed(1)
    reference = ReferenceUNet(3, 2, 4, 2)
    torch.manual_seed(1)
    fast = UNet(3, 2, 4, 2)
    for (name, p), (name_ref, p_ref) in zip(
        fast.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert name == name_ref
        assert torch.equal(p, p_ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_input_layouts_give_the_same_result(torch_backend, layout):
    reference, fast = make_pair(depth=2)
    x = torch.randn(2, 3, 12, 14)
    expected = reference(x)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 3, 24, 14)[:, :, ::2]
        expected = reference(x.contiguous())
    out = fast(x)
    assert relative_error(out, expected) <= FP32_TOLERANCE
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


def _gradient_penalty_step(model, x):
    """A gradient penalty's step (as WGAN-GP or R1 regularisation takes): the input gradient's
    squared norm, differentiated again to the weights and the input."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    return x.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_a_gradient_penalty_matches_the_reference(torch_backend, upsample):
    reference, fast = make_pair(depth=2, upsample=upsample)
    x = torch.randn(2, 3, 12, 10)
    grad_x_ref, grads_ref = _gradient_penalty_step(reference, x)
    grad_x, grads = _gradient_penalty_step(fast, x)
    assert relative_error(grad_x, grad_x_ref) <= FP32_TOLERANCE
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert relative_error(grad, grads_ref[name]) <= FP32_TOLERANCE, name


def test_batch_of_zero_gives_an_empty_result(torch_backend):
    reference, fast = make_pair(depth=2)
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    out = fast(x)
    assert out.shape == reference(x).shape == (0, 2, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_propagate_as_in_the_reference(torch_backend, value):
    reference, fast = make_pair(depth=2)
    x = torch.randn(1, 3, 8, 8)
    x[0, 1, 3, 5] = value
    expected, out = reference(x), fast(x)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(out[finite], expected[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_on_meta_tensors_it_counts_the_references_flops(upsample):
    """Meta tensors (shapes, no data: FLOP counting, deferred init) have nothing to time: each
    layer runs PyTorch's path, whose aten calls FlopCounterMode counts."""
    reference, fast = make_pair(upsample=upsample)
    flops = []
    for model in (reference.to("meta"), fast.to("meta")):
        x = torch.empty(2, 3, 16, 16, device="meta", requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            out.sum().backward()
        assert out.shape == (2, 2, 16, 16) and out.device.type == "meta"
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


@pytest.mark.parametrize("input_grad", [False, True], ids=["weights-only", "input-grad"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_on_the_ops_it_counts_the_references_flops(torch_backend, upsample, input_grad):
    """FlopCounterMode sees fastunet's custom ops, not the convolutions inside: without their
    formulas a UNet on the ops counted no FLOPs. Forward and backward, each as the reference's.
    (Its module hooks make the decoders run the reference's concat: test_upsample_concat_conv2d_relu
    counts the op that reads the concat.)"""
    reference, fast = make_pair(upsample=upsample)
    counts = []
    for model in (reference, fast):
        x = torch.randn(2, 3, 16, 16, requires_grad=input_grad)
        with FlopCounterMode(display=False) as forward:
            out = model(x)
        with FlopCounterMode(display=False) as backward:
            out.sum().backward()
        ops = {str(op) for op in {**forward.get_flop_counts()["Global"],
                                  **backward.get_flop_counts()["Global"]}}  # fmt: skip
        counts.append((forward.get_total_flops(), backward.get_total_flops(), ops))
    (ref_forward, ref_backward, _), (forward, backward, ops) = counts
    assert ops == {"fastunet.conv2d_relu", "fastunet.conv2d_grad"}
    assert (forward, backward) == (ref_forward, ref_backward)
    assert forward > 0 and backward > forward


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_forward_hooks_fire_as_on_the_reference(backend, monkeypatch):
    """Each module's hook fires in the reference's order with its input: the decoders' and their
    first convs' never fired, as UNet called the first conv's fused upsample-concat path. Their
    outputs are the reference's, but for a conv's, which is after the ReLU it fuses."""
    monkeypatch.setenv("FASTUNET_BACKEND", backend)
    reference, fast = make_pair(upsample="bilinear")
    x = torch.randn(2, 3, 16, 16)
    seen = {}
    for model in (reference, fast):
        calls = seen[model] = []
        for name, module in model.named_modules():
            if name and name != "pool":  # ReferenceUNet pools with F.max_pool2d
                module.register_forward_hook(
                    lambda _, args, out, name=name, calls=calls: calls.append((name, args[0], out))
                )
        with torch.no_grad():
            model(x)
    assert [c[0] for c in seen[fast]] == [c[0] for c in seen[reference]]
    assert any(name == "decoders.0" for name, _, _ in seen[fast])
    for (name, args, out), (_, ref_args, ref_out) in zip(seen[fast], seen[reference], strict=True):
        torch.testing.assert_close(args, ref_args, msg=lambda m, name=name: f"{name}: {m}")
        is_conv = name.endswith(("conv1", "conv2"))
        expected = ref_out.relu() if is_conv else ref_out
        torch.testing.assert_close(out, expected, msg=lambda m, name=name: f"{name}: {m}")


def test_autocast_bf16_on_cpu(torch_backend):
    reference, fast = make_pair(depth=2, base_channels=8)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = reference(x), fast(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert relative_error(out, expected) <= 1e-2
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())


def with_a_scale(model_class):
    """model_class with one more parameter, which its layers do not use: a learnt output scale."""

    class Scaled(model_class):
        def __init__(self, *args):
            super().__init__(*args)
            self.scale = torch.nn.Parameter(torch.full((1,), 2.0))

        def forward(self, x):
            return super().forward(x) * self.scale

    return Scaled


@pytest.mark.parametrize("trained", ["all", "the-extra-only"])
def test_a_subclass_with_a_parameter_its_layers_do_not_use_trains_as_the_reference(
    tmp_path, monkeypatch, trained
):
    """On the CPU UNet's first training call of a shape times it in both layouts, forward and
    backward to the model's parameters: one its layers do not reach raised "appears to not have
    been used in the graph" (and with only that one trained, "does not require grad")."""
    monkeypatch.setattr(_choice, "INTERPRET", False)  # the CPU rule: the layouts are timed
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_choice, "_caches", {})
    monkeypatch.setattr(_choice, "_decided", {})
    reference = with_a_scale(ReferenceUNet)(3, 2, 4, 2)
    fast = with_a_scale(UNet)(3, 2, 4, 2)
    fast.load_state_dict(reference.state_dict())
    if trained == "the-extra-only":
        for model in (reference, fast):
            model.requires_grad_(False).scale.requires_grad_()
    x, grad_out = torch.randn(2, 3, 16, 12), torch.randn(2, 2, 16, 12)
    results = []
    for model in (reference, fast):
        out = model(x)
        out.backward(grad_out)
        trained_grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((out, trained_grads))
    (expected, expected_grads), (out, grads) = results
    assert any(choice.reason.startswith("measured") for choice in _choice._decided.values())
    assert relative_error(out, expected) <= FP32_TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) <= FP32_TOLERANCE, name


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(3, 16, 16), ValueError, "must be 4-D"),
        (torch.randn(1, 4, 16, 16), ValueError, "4 channels .* in_channels=3"),
        (torch.randn(1, 3, 16, 3), ValueError, r"H and W must be >= 2\*\*depth = 4"),
        (torch.ones(1, 3, 16, 16, dtype=torch.int64), TypeError, "floating-point.*int64"),
        (torch.ones(1, 3, 16, 16, dtype=torch.bool), TypeError, "floating-point.*bool"),
        (torch.randn(1, 3, 16, 16, device="meta"), ValueError, "on meta .* on cpu"),
        # PyTorch's own error blames the bias
        (torch.randn(1, 3, 16, 16).half(), TypeError, "input is torch.float16 but the model's "
         "parameters are torch.float32: cast one to the other, or run under torch.autocast"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("model_class", [ReferenceUNet, UNet])
def test_bad_input_gets_a_clear_error(model_class, x, error, match):
    model = model_class(3, 2, 4, 2)
    with pytest.raises(error, match=match):
        model(x)


@pytest.mark.parametrize("model_class", [ReferenceUNet, UNet])
def test_autocast_takes_input_of_another_dtype_but_not_float64(model_class):
    model = model_class(3, 2, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 16, 16).half()).dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"input is torch\.float64"):  # autocast leaves it
            model(torch.randn(1, 3, 16, 16).double())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(depth=0), "depth must be a positive int"),
        (dict(base_channels=-1), "base_channels must be a positive int"),
        (dict(depth=True), "depth must be a positive int, got True"),
        (dict(upsample="bicubic"), "upsample must be one of"),
    ],
)
def test_bad_arguments_get_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


@drawn(8)
@given(
    batch=st.integers(0, 2),
    in_channels=st.integers(1, 3),
    num_classes=st.integers(1, 3),
    depth=st.integers(1, 3),
    base_channels=st.integers(1, 4),
    axes=UNET_AXES,
    upsample=UPSAMPLE_MODES,
    layout=INPUT_LAYOUTS,
    seed=st.integers(0, 2**32 - 1),
)
def test_drawn_models_match_the_reference(
    backend, batch, in_channels, num_classes, depth, base_channels, axes, upsample, layout, seed
):
    """Whole models, forward and every gradient, on both backends (the kernels run in Triton's
    interpreter without a GPU): hypothesis draws the architecture, the input's size and its
    memory layout."""
    torch.manual_seed(seed)
    device = backend_device(backend)
    reference, fast = make_pair(depth, base_channels, in_channels, num_classes, *upsample)
    size = unet_size(depth, axes)
    x = in_layout(torch.randn(batch, in_channels, *size, device=device), layout)
    assert_same_results(reference.to(device), fast.to(device), x)


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_a_cuda_graph_replays_unet_as_eager_runs_it(kernels_backend, upsample, training):
    """At batch 1 the host's time per op can pass the GPU's; a CUDA graph (torch.cuda.graph, or
    torch.compile(mode="reduce-overhead")) launches a whole step at once. After a warm-up on a
    side stream (tiles tuned, choices and axis tables cached), a step captures: every launch on
    the capturing stream, no host copy or sync. Its replay on a new input gives eager's bits,
    forward and every weight gradient."""
    model = UNet(3, 2, base_channels=8, depth=3, upsample=upsample).to(KERNEL_DEVICE)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 40, 36, device=KERNEL_DEVICE)
    grad_out = torch.randn(1, 2, 40, 36, device=KERNEL_DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(training):
            out = model(x)
        if training:
            out.backward(grad_out)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    replayed_grads = [p.grad.clone() for p in model.parameters()] if training else []
    replayed = replayed.clone()
    expected = step()
    assert_same_bits(replayed, expected)
    for replayed_grad, p in zip(replayed_grads, model.parameters(), strict=True):
        assert_same_bits(replayed_grad, p.grad)
