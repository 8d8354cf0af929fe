"""fastunet.ops.upsample_concat on the Triton kernels: forward, gradients, layouts, edge cases.

Kernel tier: small shapes on the device whose tensors run the Triton kernels, the CPU under
Triton's interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1), else CUDA.
GPU tier (marked gpu): the UNet decoder's shapes on CUDA in every dtype.

Tolerances: nearest is a copy, so its forward is bitwise PyTorch's. Every dtype meets the parity
rule: against a float64 reference, our error is at most 2x PyTorch's own in the same dtype. At the
kernel tier's small shapes fp32 is also held within 1e-6 of PyTorch's forward (relative, and
absolute for values of order 1) and within 1e-5 relative, 1e-6 absolute of its gradients (the
sums run in another order); over the GPU tier's millions of elements, the parity rule alone.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    KERNEL_DEVICE,
    assert_kernel_backend,
    backend_device,
    in_layout,
    output_and_grads,
    torch_upsample_concat,
)

from fastunet import ops
from fastunet.kernels import upsample_concat as kernels

# The module, not the op of the same name that `fastunet.ops` exports.
op_module = importlib.import_module("fastunet.ops.upsample_concat")

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The interpreter has no bfloat16.
KERNEL_DTYPES = ALL_DTYPES if KERNEL_DEVICE == "cuda" else ALL_DTYPES[:2]
MODES = [("nearest", False), ("bilinear", False), ("bilinear", True)]
MODE_IDS = ["nearest", "bilinear", "bilinear-align_corners"]

# (x shape, skip shape): x is upsampled to skip's H, W.
SIZES = {
    "2x": ((2, 5, 4, 5), (2, 3, 8, 10)),
    "odd": ((2, 5, 3, 5), (2, 3, 7, 11)),
    "smaller": ((2, 5, 7, 6), (2, 3, 3, 4)),
    "same": ((2, 5, 6, 7), (2, 3, 6, 7)),
    "taller-narrower": ((2, 5, 3, 9), (2, 3, 7, 4)),
    "1x1-input": ((2, 5, 1, 1), (2, 3, 5, 3)),
    "1x1-output": ((2, 5, 4, 3), (2, 3, 1, 1)),
    # More channels than one program's block, with the skip/x boundary inside a block.
    "many-channels": ((1, 130, 3, 3), (1, 70, 6, 5)),
}

# UNet(base_channels=64) on a 16 x 3 x 256 x 256 batch: the decoder level with skip channels c at
# size s upsamples x, 2c channels at s/2.
DECODER_LEVELS = {f"c{c}-{s}x{s}": ((16, 2 * c, s // 2, s // 2), (16, c, s, s)) for c, s in (
    (64, 256), (128, 128), (256, 64), (512, 32)
)}  # fmt: skip


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """The op's outputs start as NaN, so an element the kernels leave unwritten fails a test."""

    def empty_nan(shape, like, dtype=None):
        out = torch.empty(
            shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last
        )
        return out.fill_(float("nan"))

    monkeypatch.setattr(op_module, "empty_channels_last", empty_nan)


def upsample_concat(x, skip, mode, align_corners):
    """The op, after checking that it runs the Triton kernels, not the composite."""
    assert_kernel_backend("upsample_concat", x.device, x.dtype)
    return ops.upsample_concat(x, skip, mode, align_corners)


def forward_and_grads(function, x, skip, grad_out, mode, align_corners):
    """[out, grad_x, grad_skip] of function(x, skip, mode, align_corners) given grad_out."""
    return output_and_grads(function, (x, skip), grad_out, mode, align_corners)


def random_case(x_shape, skip_shape, dtype, device=KERNEL_DEVICE):
    x = torch.randn(x_shape, dtype=dtype, device=device)
    skip = torch.randn(skip_shape, dtype=dtype, device=device)
    grad_out = torch.randn(
        skip_shape[0], skip_shape[1] + x_shape[1], *skip_shape[2:], dtype=dtype, device=device
    )
    return x, skip, grad_out


def max_error(actual, exact):
    return (actual.double() - exact).abs().max().item()


def assert_parity(ours, pytorch, exact):
    """Our error against the float64 result is at most 2x PyTorch's own, tensor by tensor."""
    for name, a, b, e in zip(("out", "grad_x", "grad_skip"), ours, pytorch, exact, strict=True):
        our_error, pytorch_error = max_error(a, e), max_error(b, e)
        assert our_error <= 2 * pytorch_error, f"{name}: {our_error:.3g} vs {pytorch_error:.3g}"


def check_against_pytorch(x, skip, grad_out, mode, align_corners, fp32_tight=True):
    """Forward and both gradients of the op against PyTorch's, by the rules of the docstring."""
    ours = forward_and_grads(upsample_concat, x, skip, grad_out, mode, align_corners)
    pytorch = forward_and_grads(torch_upsample_concat, x, skip, grad_out, mode, align_corners)
    out, grad_x, grad_skip = ours
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grad_skip, pytorch[2])  # a slice of grad_out
    if mode == "nearest":
        assert torch.equal(out, pytorch[0])
    if fp32_tight and x.dtype == torch.float32:
        torch.testing.assert_close(out, pytorch[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_x, pytorch[1], rtol=1e-5, atol=1e-6)
    exact = forward_and_grads(
        torch_upsample_concat, x.double(), skip.double(), grad_out.double(), mode, align_corners
    )
    assert_parity(ours, pytorch, exact)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_matches_pytorch(mode, align_corners, shapes, dtype):
    check_against_pytorch(*random_case(*shapes, dtype), mode, align_corners)


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_input_layouts_give_the_same_bits(mode, align_corners):
    x, skip, grad_out = random_case(*SIZES["odd"], torch.float32)
    expected = forward_and_grads(upsample_concat, x, skip, grad_out, mode, align_corners)
    for layout in ("contiguous", "channels_last", "strided"):
        x_, skip_, grad_out_ = (in_layout(t, layout) for t in (x, skip, grad_out))
        got = forward_and_grads(upsample_concat, x_, skip_, grad_out_, mode, align_corners)
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g), layout


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_launchers_write_every_element_of_any_output_layout(mode, align_corners):
    x, skip, grad_out = random_case(*SIZES["odd"], torch.float32)
    expected_out, expected_grad_x, _ = forward_and_grads(
        torch_upsample_concat, x, skip, grad_out, mode, align_corners
    )
    for layout in ("contiguous", "channels_last", "strided"):
        out = in_layout(torch.full_like(expected_out, float("nan")), layout)
        kernels.upsample_concat_forward(x, skip, mode, align_corners, out)
        torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
        grad_x = in_layout(torch.full_like(x, float("nan")), layout)
        kernels.upsample_backward(grad_out[:, skip.shape[1] :], mode, align_corners, grad_x)
        torch.testing.assert_close(grad_x, expected_grad_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_backward_is_bitwise_repeatable(mode, align_corners):
    x, skip, grad_out = random_case(*SIZES["odd"], torch.float16)
    x.requires_grad_()
    out = upsample_concat(x, skip, mode, align_corners)
    first, second = (torch.autograd.grad(out, x, grad_out, retain_graph=True)[0] for _ in range(2))
    assert torch.equal(first, second)


# The interpreter computes with numpy, which warns on 0 * Inf.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_nan_and_inf_propagate_as_in_pytorch(mode, align_corners):
    x, skip, grad_out = random_case(*SIZES["2x"], torch.float32)
    x[0, 0, 1, 1], x[0, 1, 3, 4], x[1, 2, 0, 0] = float("nan"), float("inf"), float("-inf")
    skip[1, 0, 2, 3] = float("nan")
    grad_out[0, 1, 0, 1] = float("-inf")  # a skip channel
    grad_out[0, 3, 2, 2], grad_out[0, 4, 7, 9], grad_out[1, 5, 0, 1] = (
        float("inf"), float("nan"), float("-inf")
    )  # fmt: skip
    ours = forward_and_grads(upsample_concat, x, skip, grad_out, mode, align_corners)
    pytorch = forward_and_grads(torch_upsample_concat, x, skip, grad_out, mode, align_corners)
    for o, p in zip(ours, pytorch, strict=True):
        assert not p.isfinite().all()  # the case does test non-finite values
        torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_batch_of_zero_launches_nothing(monkeypatch, mode, align_corners):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"a kernel was launched on grid {grid} for an empty tensor")

    monkeypatch.setattr(kernels, "_upsample_concat_forward_kernel", NoLaunch())
    monkeypatch.setattr(kernels, "_upsample_backward_kernel", NoLaunch())
    x, skip, grad_out = random_case((0, 5, 3, 4), (0, 3, 7, 9), torch.float32)
    out, grad_x, grad_skip = forward_and_grads(
        upsample_concat, x, skip, grad_out, mode, align_corners
    )
    assert out.shape == (0, 8, 7, 9)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad_x.shape == x.shape
    assert grad_skip.shape == skip.shape


@pytest.mark.parametrize(
    "x_shape,skip_shape,match",
    [
        ((2, 0, 3, 4), (2, 3, 7, 9), "x has no channels or an empty spatial size"),
        ((2, 5, 3, 0), (2, 3, 7, 9), "x has no channels or an empty spatial size"),
        ((2, 5, 3, 4), (2, 3, 0, 9), "skip has an empty spatial size"),
    ],
)
def test_empty_x_or_output_size_is_an_error_as_in_pytorch(x_shape, skip_shape, match):
    x, skip, _ = random_case(x_shape, skip_shape, torch.float32)
    with pytest.raises(RuntimeError):
        torch_upsample_concat(x, skip, "nearest", False)
    with pytest.raises(ValueError, match=match):
        upsample_concat(x, skip, "nearest", False)


def pytorch_axis_weights(in_size, out_size, mode, align_corners, device):
    """[in, out]: the weight PyTorch gives input row i in output row o, read off one-hot rows."""
    one_hot_rows = torch.eye(in_size, device=device).view(in_size, 1, in_size, 1)
    kwargs = {} if mode == "nearest" else {"align_corners": align_corners}
    return F.interpolate(one_hot_rows, size=(out_size, 1), mode=mode, **kwargs)[:, 0, :, 0].cpu()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_axis_tables_hold_pytorchs_weights_bitwise(mode, align_corners, device):
    for in_size in range(1, 17):
        for out_size in range(1, 41):
            t = kernels.axis_tables(in_size, out_size, mode, align_corners, torch.device("cpu"))
            weights = torch.zeros(in_size, out_size)
            outputs = torch.arange(out_size)
            weights[t.src0.long(), outputs] += t.lambda0
            if mode != "nearest":  # nearest's src1 repeats src0 with weight 0
                weights[t.src1.long(), outputs] += t.lambda1
            expected = pytorch_axis_weights(in_size, out_size, mode, align_corners, device)
            assert torch.equal(weights, expected), (in_size, out_size)


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_axis_tables_give_each_input_exactly_the_outputs_that_read_it(mode, align_corners):
    for in_size in range(1, 10):
        for out_size in range(1, 10):
            t = kernels.axis_tables(in_size, out_size, mode, align_corners, torch.device("cpu"))
            for i in range(in_size):
                readers = ((t.src0 == i) | (t.src1 == i)).nonzero().flatten().tolist()
                first, count = t.first[i].item(), t.count[i].item()
                assert readers == list(range(first, first + count)), (in_size, out_size, i)
            assert t.max_count == t.count.max().item()


# GPU tier: the UNet decoder's shapes.


def decoder_case(shapes, dtype):
    x, skip, grad_out = random_case(*shapes, dtype, device="cuda")
    channels_last = torch.channels_last
    return (
        x.contiguous(memory_format=channels_last),
        skip.contiguous(memory_format=channels_last),
        grad_out.contiguous(memory_format=channels_last),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", DECODER_LEVELS.values(), ids=DECODER_LEVELS.keys())
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_decoder_levels_match_pytorch_on_gpu(mode, align_corners, shapes, dtype):
    check_against_pytorch(*decoder_case(shapes, dtype), mode, align_corners, fp32_tight=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", DECODER_LEVELS.values(), ids=DECODER_LEVELS.keys())
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_decoder_levels_backward_is_deterministic_over_10_runs(mode, align_corners, shapes, dtype):
    x, skip, grad_out = decoder_case(shapes, dtype)
    x.requires_grad_()
    out = upsample_concat(x, skip, mode, align_corners)
    first = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
    for _ in range(9):
        assert torch.equal(torch.autograd.grad(out, x, grad_out, retain_graph=True)[0], first)


def check_last_image(x_shape, skip_shape, mode, align_corners, device):
    """The op on a batch, its last image against PyTorch on that image alone (bf16)."""
    x = torch.randn(x_shape, device=device).to(torch.bfloat16)
    skip = torch.randn(skip_shape, device=device).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    skip = skip.contiguous(memory_format=torch.channels_last)
    out = upsample_concat(x, skip, mode, align_corners)
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    last = slice(x_shape[0] - 1, x_shape[0])
    grad_out = torch.ones_like(out[last], dtype=torch.float32)
    expected, expected_grad, _ = forward_and_grads(
        torch_upsample_concat, x[last].detach().float(), skip[last].float(), grad_out, mode,
        align_corners,
    )  # fmt: skip
    assert torch.allclose(out[last].float(), expected, rtol=1e-2, atol=1e-2)
    assert torch.allclose(grad_x[last].float(), expected_grad, rtol=1e-2, atol=1e-2)
    return out.numel()


@pytest.mark.gpu
@pytest.mark.bigmem
@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_output_beyond_int32_offsets_on_gpu(mode, align_corners):
    """An output of more than 2**31 elements: offsets past the mark must be int64."""
    shapes = (3, 96, 1024, 1024), (3, 96, 2048, 2048)
    assert check_last_image(*shapes, mode, align_corners, "cuda") > 2**31


@pytest.mark.parametrize("mode,align_corners", MODES, ids=MODE_IDS)
def test_upsampled_channels_first(backend, mode, align_corners):
    """skip_first=False gives cat([up, skip]): bit for bit the skip-first result reordered, and
    so are the gradients, on both backends."""
    device = backend_device(backend)
    x, skip, grad_out = random_case(*SIZES["many-channels"], torch.float32, device)
    c_skip, c_x = skip.shape[1], x.shape[1]
    up_first = output_and_grads(
        ops.upsample_concat, (x, skip), grad_out, mode, align_corners, False
    )
    skip_first_grad = torch.cat([grad_out[:, c_x:], grad_out[:, :c_x]], 1)
    out, grad_x, grad_skip = output_and_grads(
        ops.upsample_concat, (x, skip), skip_first_grad, mode, align_corners, True
    )
    assert up_first[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(up_first[0], torch.cat([out[:, c_skip:], out[:, :c_skip]], 1))
    assert torch.equal(up_first[1], grad_x) and torch.equal(up_first[2], grad_skip)
