"""The decoder conv without a concat tensor: fastunet::upsample_concat_conv2d_relu.

Kernel tier: small, odd shapes on the device that runs the Triton kernels (the CPU under the
interpreter without a GPU), against float64: forward and the gradients of x, skip, weight and
bias, both modes, both layouts, NaN-poisoned allocations, a bitwise-repeatable backward. Then
opcheck, torch.compile, the UNet's decoders, and what the UNet saves for the backward.
"""

import pytest
import torch
from helpers import (
    AUTOTUNED,
    AUTOTUNED_IDS,
    KERNEL_DEVICE,
    assert_kernel_backend,
    assert_parity,
    force_tile,
    in_layout,
    output_and_grads,
    poison_allocations,
    tile_dtypes,
    torch_conv2d_relu,
    torch_upsample_concat,
)
from torch.library import opcheck
from torch.utils.flop_counter import FlopCounterMode

from fastunet import ReferenceUNet, UNet, ops
from fastunet.bench.parity import relative_error
from fastunet.ops.upsample_concat_conv2d_relu import upsample_concat_conv2d_grad

MODES = [("nearest", False), ("bilinear", False), ("bilinear", True)]
MODE_IDS = ["nearest", "bilinear", "bilinear-align_corners"]

# (x shape, skip shape, C_out, kernel, padding, bias, relu): 2x, odd and identity-size axes,
# channel counts off every block size, the skip/x boundary inside a channel block.
CASES = {
    "2x": ((2, 6, 3, 4), (2, 5, 6, 8), 7, 3, 1, True, True),
    "odd": ((1, 3, 3, 5), (1, 4, 7, 11), 5, 3, 1, False, True),
    "same-size": ((1, 4, 5, 6), (1, 3, 5, 6), 4, 3, 1, True, False),
    "head-like-1x1": ((2, 5, 2, 3), (2, 3, 4, 5), 2, 1, 0, True, False),
    "many-channels": ((1, 40, 2, 2), (1, 37, 4, 3), 6, 3, 1, True, True),
}


def fused(x, skip, weight, bias, padding, relu, mode, align_corners):
    return ops.upsample_concat_conv2d_relu(
        x, skip, weight, bias, padding, relu, mode, align_corners
    )


def unfused(x, skip, weight, bias, padding, relu, mode, align_corners):
    concat = torch_upsample_concat(x, skip, mode, align_corners)
    return torch_conv2d_relu(concat, weight, bias, padding, relu)


def make_case(case, dtype, layout, device=KERNEL_DEVICE):
    """case: a name in CASES, or such a tuple."""
    x_shape, skip_shape, c_out, kernel, padding, bias, relu = CASES.get(case, case)
    c_in = x_shape[1] + skip_shape[1]
    x = in_layout(torch.randn(x_shape, device=device, dtype=dtype), layout)
    skip = in_layout(torch.randn(skip_shape, device=device, dtype=dtype), layout)
    weight = torch.randn(c_out, c_in, kernel, kernel, device=device) * (c_in * kernel**2) ** -0.5
    b = torch.randn(c_out, device=device, dtype=dtype) if bias else None
    grad_out = torch.randn(skip_shape[0], c_out, skip_shape[2] + 2 * padding - kernel + 1,
                           skip_shape[3] + 2 * padding - kernel + 1, device=device)  # fmt: skip
    return [x, skip, weight.to(dtype), b], (padding, relu), grad_out


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_against_float64(
    case, dtype, layout, mode, align_corners, monkeypatch
):
    assert_kernel_backend("conv2d_relu", KERNEL_DEVICE, dtype)
    check_against_float64(case, dtype, layout, mode, align_corners, monkeypatch)


def check_against_float64(case, dtype, layout, mode, align_corners, monkeypatch):
    """The output and every gradient against float64: fp32 within 1e-5, half types within
    PyTorch's own error in that dtype (`assert_parity`), NaN-poisoned allocations."""
    inputs, (padding, relu), grad_out = make_case(case, dtype, layout)
    args = (padding, relu, mode, align_corners)
    poison_allocations(monkeypatch)
    ours = output_and_grads(fused, inputs, grad_out, *args)
    as64 = [None if t is None else t.double() for t in inputs]
    truth = output_and_grads(unfused, as64, grad_out, *args)
    theirs = output_and_grads(unfused, inputs, grad_out, *args)
    names = ["output", "grad_x", "grad_skip", "grad_weight", "grad_bias"]
    for name, got, expected, torch_got in zip(names, ours, truth, theirs, strict=True):
        if expected is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == expected.shape, name
        assert not got.isnan().any(), f"{name} has NaN"
        if dtype == torch.float32:
            assert relative_error(got, expected) <= 1e-5, name
        else:
            assert_parity(got, torch_got, expected, name)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


# No tile divides it: 144 output pixels, 67 input channels (skip's 27 end inside a channel block
# of every size), 37 output channels; x is upsampled from 5x4 to 9x8.
TILE_CASE = ((2, 40, 5, 4), (2, 27, 9, 8), 37, 3, 1, True, True)


@pytest.mark.parametrize("kernel_name,config", AUTOTUNED, ids=AUTOTUNED_IDS)
def test_every_autotuned_tile(kernel_name, config, monkeypatch):
    """Each tile with the concat loader: bilinear, whose loader blends four pixels of x."""
    force_tile(monkeypatch, kernel_name, config)
    for dtype in tile_dtypes(config):
        assert_kernel_backend("upsample_concat_conv2d_relu", KERNEL_DEVICE, dtype)
        check_against_float64(TILE_CASE, dtype, "channels_last", "bilinear", False, monkeypatch)


def test_nan_in_x_reaches_the_same_outputs_as_pytorch():
    inputs, (padding, relu), _ = make_case("2x", torch.float32, "channels_last")
    inputs[0][0, 2, 1, 1] = float("nan")
    for mode, align_corners in MODES:
        args = (*inputs, padding, relu, mode, align_corners)
        assert torch.equal(fused(*args).isnan(), unfused(*args).isnan()), mode


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_backward_is_bitwise_repeatable(mode, align_corners):
    inputs, (padding, relu), grad_out = make_case("odd", torch.float16, "channels_last")
    args = (padding, relu, mode, align_corners)
    first = output_and_grads(fused, inputs, grad_out, *args)
    second = output_and_grads(fused, inputs, grad_out, *args)
    for a, b in zip(first, second, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_batch_of_zero():
    x = torch.randn(0, 4, 3, 3, device=KERNEL_DEVICE, requires_grad=True)
    skip = torch.randn(0, 2, 6, 6, device=KERNEL_DEVICE, requires_grad=True)
    weight = torch.randn(3, 6, 3, 3, device=KERNEL_DEVICE, requires_grad=True)
    out = ops.upsample_concat_conv2d_relu(x, skip, weight)
    assert out.shape == (0, 3, 6, 6)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_errors_name_the_shapes():
    x, skip = torch.randn(1, 4, 3, 3), torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match="expects 5"):
        ops.upsample_concat_conv2d_relu(x, skip, torch.randn(3, 5, 3, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.upsample_concat_conv2d_relu(x, skip, torch.randn(3, 6, 3, 3), mode="bicubic")


def opcheck_cases():
    inputs, (padding, relu), grad_out = make_case("odd", torch.float32, "channels_last")
    x, skip, weight = (t.requires_grad_() for t in inputs[:3])
    grad = grad_out.contiguous(memory_format=torch.channels_last)
    fused_op, grad_op = ops.upsample_concat_conv2d_relu, upsample_concat_conv2d_grad
    detached = x.detach(), skip.detach(), weight.detach()
    return [
        (fused_op, (x, skip, weight, None, padding, relu, "nearest", False)),
        (fused_op, (x, skip, weight, None, 0, False, "bilinear", True)),
        (grad_op, (grad, *detached, 1, "bilinear", False, True, True)),
        (grad_op, (grad, *detached, 1, "nearest", False, False, True)),
        (grad_op, (grad, *detached, 1, "bilinear", True, True, False)),
    ]


@pytest.mark.parametrize("grads", ["weight", "skip", "x-and-weight"])
@pytest.mark.parametrize("case", ["2x", "head-like-1x1"])
def test_flop_counter_counts_the_convolution_on_the_concat(case, grads, torch_backend):
    """FlopCounterMode sees the op, not the convolution inside: its formulas count what aten's
    convolution and convolution_backward on the concat count, forward and backward."""
    inputs, (padding, relu), grad_out = make_case(case, torch.float32, "contiguous", "cpu")
    wanted = {"weight": (2,), "skip": (1,), "x-and-weight": (0, 2)}[grads]
    counts = []
    for function in (fused, unfused):
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None
                  for i, t in enumerate(inputs)]  # fmt: skip
        with FlopCounterMode(display=False) as forward:
            out = function(*leaves, padding, relu, "bilinear", False)
        with FlopCounterMode(display=False) as backward:
            out.backward(grad_out)
        counts.append((forward.get_total_flops(), backward.get_total_flops()))
    assert counts[0] == counts[1]
    assert counts[0][0] > 0 and counts[0][1] > 0


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    opcheck(op, args)


def test_compiles_with_fullgraph():
    inputs, (padding, relu), _ = make_case("2x", torch.float32, "channels_last")
    args = (*inputs, padding, relu, "bilinear", False)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fused(*args))


def test_unet_decoders_use_it(kernels_backend, monkeypatch):
    calls = []
    real = ops.upsample_concat_conv2d_relu
    monkeypatch.setattr(ops, "upsample_concat_conv2d_relu", lambda *a: calls.append(1) or real(*a))
    reference = ReferenceUNet(3, 2, 4, 2, upsample="bilinear").to(KERNEL_DEVICE)
    fast = UNet.from_reference(reference)
    x = torch.randn(1, 3, 12, 8, device=KERNEL_DEVICE)
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # one per decoder level
    assert fast.state_dict().keys() == reference.state_dict().keys()


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves for the backward of model(x), parameters
    left out (the model holds them anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_unet_saves_at_most_0_7x_what_the_reference_saves(kernels_backend):
    reference = ReferenceUNet(3, 2, 8, 4).to(KERNEL_DEVICE)
    fast = UNet.from_reference(reference)
    x = torch.randn(1, 3, 32, 32, device=KERNEL_DEVICE, requires_grad=True)
    ours, theirs = saved_bytes(fast, x), saved_bytes(reference, x)
    assert ours <= 0.7 * theirs, f"{ours} bytes saved against the reference's {theirs}"


# GPU tier: the first decoder conv of UNet(base_channels=64, depth=4) on 256x256, at batch 2 (the
# float64 reference stays quick; channels and sizes are the real ones), in every dtype.
GPU_LEVELS = {f"c{c}-{s}x{s}": ((2, 2 * c, s // 2, s // 2), (2, c, s, s)) for c, s in (
    (64, 256), (128, 128), (256, 64), (512, 32)
)}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes", GPU_LEVELS.values(), ids=GPU_LEVELS.keys())
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_unet_decoder_levels_on_gpu(shapes, mode, align_corners, dtype, monkeypatch):
    assert_kernel_backend("upsample_concat_conv2d_relu", "cuda", dtype)
    x_shape, skip_shape = shapes
    c_skip, c_in = skip_shape[1], skip_shape[1] + x_shape[1]
    x = torch.randn(x_shape, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    skip = torch.randn(skip_shape, device="cuda", dtype=dtype)
    skip = skip.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_skip, c_in, 3, 3, device="cuda") / (9 * c_in) ** 0.5).to(dtype)
    bias = torch.randn(c_skip, device="cuda", dtype=dtype)
    grad_out = torch.randn(skip_shape, device="cuda")
    inputs, args = [x, skip, weight, bias], (1, True, mode, align_corners)
    poison_allocations(monkeypatch)
    ours = output_and_grads(fused, inputs, grad_out, *args)
    truth = output_and_grads(unfused, [t.double() for t in inputs], grad_out, *args)
    theirs = output_and_grads(unfused, inputs, grad_out, *args)
    names = ["output", "grad_x", "grad_skip", "grad_weight", "grad_bias"]
    for name, got, expected, torch_got in zip(names, ours, truth, theirs, strict=True):
        assert not got.isnan().any(), f"{name} has NaN"
        assert_parity(got, torch_got, expected, name)
