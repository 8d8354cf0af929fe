"""The Triton conv2d + bias + ReLU kernels against the PyTorch composite, forward and backward.

CPU tier: Triton's interpreter at small, odd shapes in fp32 and fp16. GPU tier (`gpu`): the
UNet's real shapes in every dtype, against a float64 reference.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    AUTOTUNED,
    AUTOTUNED_CONFIGS,
    AUTOTUNED_IDS,
    KERNEL_DEVICE,
    assert_kernel_backend,
    assert_parity,
    backend_device,
    force_tile,
    output_and_grads,
    poison_allocations,
    tile_dtypes,
    torch_conv2d_relu,
)

from fastunet import kernels, ops
from fastunet.bench.parity import relative_error
from fastunet.bench.shapes import unet_shapes
from fastunet.ops.conv2d_relu import conv2d_relu_grad_output


def conv_relu_with_grads(conv, x, weight, bias, padding, relu, grad_out):
    """[out, grad_x, grad_weight, grad_bias] of conv(x, weight, bias, padding, relu)."""
    return output_and_grads(conv, (x, weight, bias), grad_out, padding, relu)


def make_case(batch, c_in, c_out, h, w, kernel, bias, dtype, device, layout="contiguous"):
    x = torch.randn(batch, c_in, h, w, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor
        x = torch.randn(batch, c_in, h, 2 * w, device=device, dtype=dtype)[..., ::2]
    scale = (c_in * kernel * kernel) ** -0.5
    weight = torch.randn(c_out, c_in, kernel, kernel, device=device, dtype=dtype) * scale
    b = torch.randn(c_out, device=device, dtype=dtype) if bias else None
    return x, weight, b


def check_against_float64(x, weight, bias, padding, relu, fp32_tolerance=1e-5):
    """Every output of the op against float64, and for half types against PyTorch's own error."""
    h_out = x.shape[2] + 2 * padding - weight.shape[2] + 1
    w_out = x.shape[3] + 2 * padding - weight.shape[3] + 1
    grad_out = torch.randn(x.shape[0], weight.shape[0], h_out, w_out, device=x.device)
    ours = conv_relu_with_grads(ops.conv2d_relu, x, weight, bias, padding, relu, grad_out)
    as64 = [None if t is None else t.double() for t in (x, weight, bias)]
    truth = conv_relu_with_grads(torch_conv2d_relu, *as64, padding, relu, grad_out)
    mine = conv_relu_with_grads(torch_conv2d_relu, x, weight, bias, padding, relu, grad_out)
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, got, expected, torch_got in zip(names, ours, truth, mine, strict=True):
        if expected is None:
            assert got is None
            continue
        assert got.dtype == x.dtype and got.shape == expected.shape, name
        assert not got.isnan().any(), f"{name} has NaN"
        if x.dtype == torch.float32 and fp32_tolerance is not None:
            assert relative_error(got, expected) <= fp32_tolerance, name
        else:
            assert_parity(got, torch_got, expected, name)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


# (batch, C_in, C_out, H, W, kernel, padding, bias, relu): channel counts off multiples of 16,
# odd sizes, batch 1, 1x1 and 3x3 (and 2x2, 5x5), with and without bias, ReLU on and off.
CPU_CASES = [
    (1, 3, 5, 7, 9, 3, 1, True, True),
    (2, 17, 19, 5, 6, 3, 1, False, True),
    (1, 20, 33, 6, 5, 1, 0, True, False),
    (2, 5, 7, 9, 7, 3, 0, True, True),
    (1, 6, 4, 5, 5, 5, 2, False, False),
    (1, 4, 3, 6, 7, 2, 1, True, True),
    (1, 33, 2, 4, 4, 1, 0, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("batch,c_in,c_out,h,w,kernel,padding,bias,relu", CPU_CASES)
def test_conv2d_relu_small_shapes(batch, c_in, c_out, h, w, kernel, padding, bias, relu, layout,
                                  dtype):  # fmt: skip
    assert_kernel_backend("conv2d_relu", KERNEL_DEVICE, dtype)
    x, weight, b = make_case(batch, c_in, c_out, h, w, kernel, bias, dtype, KERNEL_DEVICE, layout)
    check_against_float64(x, weight, b, padding, relu)


def test_every_output_element_is_written(monkeypatch):
    x, weight, bias = make_case(2, 5, 6, 7, 5, 3, True, torch.float32, KERNEL_DEVICE)
    poison_allocations(monkeypatch)
    check_against_float64(x, weight, bias, 1, True)


def test_expanded_grad_output_and_frozen_input():
    """grad_output with zero strides (from .sum()), and a leaf that needs no gradient."""
    x, weight, bias = make_case(1, 4, 6, 6, 5, 3, True, torch.float32, KERNEL_DEVICE)
    weight.requires_grad_()
    ops.conv2d_relu(x, weight, bias).sum().backward()
    expected = weight.detach().clone().requires_grad_()
    torch_conv2d_relu(x, expected, bias, 1, True).sum().backward()
    assert relative_error(weight.grad, expected.grad) <= 1e-5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_torch(value):
    x, weight, bias = make_case(1, 3, 4, 6, 6, 3, True, torch.float32, KERNEL_DEVICE)
    x[0, 1, 2, 3] = value
    out, expected = ops.conv2d_relu(x, weight, bias), torch_conv2d_relu(x, weight, bias, 1, True)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())


def test_batch_of_zero():
    x, weight, bias = make_case(0, 3, 4, 6, 6, 3, True, torch.float32, KERNEL_DEVICE)
    x.requires_grad_()
    weight.requires_grad_()
    out = ops.conv2d_relu(x, weight, bias)
    assert out.shape == (0, 4, 6, 6)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_backward_is_bitwise_repeatable():
    x, weight, bias = make_case(2, 6, 5, 9, 8, 3, True, torch.float16, KERNEL_DEVICE)
    grad_out = torch.randn(2, 5, 9, 8, device=KERNEL_DEVICE)
    first = conv_relu_with_grads(ops.conv2d_relu, x, weight, bias, 1, True, grad_out)
    second = conv_relu_with_grads(ops.conv2d_relu, x, weight, bias, 1, True, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# GPU tier: every conv of base_channels=64, depth=4 on a 256x256 input (batch 2 keeps the float64
# reference quick; the channel and spatial shapes are the real ones).
GPU_SHAPES = unet_shapes(batch=2, size=256)["conv"]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[s.name for s in GPU_SHAPES])
def test_conv2d_relu_unet_shapes_on_gpu(shape, dtype, monkeypatch):
    assert_kernel_backend("conv2d_relu", "cuda", dtype)
    x, weight, bias = make_case(
        shape.batch, shape.in_channels, shape.out_channels, shape.height, shape.width,
        shape.kernel, True, dtype, "cuda", "channels_last",
    )  # fmt: skip
    poison_allocations(monkeypatch)
    check_against_float64(x, weight, bias, shape.padding, shape.relu)


def test_tf32_is_used_exactly_where_pytorchs_cuda_convolution_uses_it(monkeypatch):
    """cuDNN's allow_tf32 while cuDNN runs PyTorch's CUDA convolutions; without cuDNN (off or
    not built) its fallback's matrix products follow cuBLAS's (on fake CUDA tensors here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastunet.kernels.conv2d_relu import _input_precision

    with FakeTensorMode():
        x = torch.empty(1, 2, 3, 3, device="cuda")
        half = torch.empty(1, 2, 3, 3, device="cuda", dtype=torch.float16)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    for built, enabled, cudnn_tf32, matmul_tf32, expected in [
        (True, True, True, False, "tf32"),
        (True, True, False, True, "ieee"),
        (True, False, True, False, "ieee"),
        (True, False, False, True, "tf32"),
        (False, True, True, False, "ieee"),
    ]:
        monkeypatch.setattr(kernels, "CUDNN_BUILT", built)
        cudnn.allow_tf32, matmul.allow_tf32 = cudnn_tf32, matmul_tf32  # restored by _ieee_fp32
        with cudnn.flags(enabled=enabled, allow_tf32=cudnn_tf32):
            assert _input_precision(x) == expected, (built, enabled, cudnn_tf32, matmul_tf32)
            assert _input_precision(half) == "ieee"
    assert _input_precision(torch.empty(1, 2, 3, 3)) == "ieee"  # a CPU tensor


def test_tf32_follows_pytorchs_newer_precision_settings(monkeypatch):
    """Set through `fp32_precision` (torch 2.9 on), where reading the older allow_tf32 flags
    raises: cuDNN's conv setting decides while cuDNN convolves, cuBLAS's matmul setting without
    it (fake CUDA tensors here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastunet.kernels.conv2d_relu import _input_precision

    with FakeTensorMode():
        x = torch.empty(1, 2, 3, 3, device="cuda")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    monkeypatch.setattr(kernels, "CUDNN_BUILT", True)
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision
    try:
        for enabled, conv, rnn, cublas, expected in [
            (True, "ieee", "tf32", "none", "ieee"),
            (True, "tf32", "ieee", "none", "tf32"),
            (False, "tf32", "tf32", "tf32", "tf32"),
            (False, "tf32", "tf32", "ieee", "ieee"),
        ]:
            cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, rnn
            matmul.fp32_precision = cublas
            monkeypatch.setattr(cudnn, "enabled", enabled)  # cudnn.flags reads allow_tf32
            assert _input_precision(x) == expected, (enabled, conv, rnn, cublas)
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[:2]
        matmul.fp32_precision = saved[2]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["enc0.conv2", "enc3.conv2", "dec1.conv1"])
def test_tf32_follows_cudnn_setting(name, monkeypatch):
    """With cudnn.allow_tf32 on, fp32 uses TF32 like cuDNN: within 2x its error (+1e-4)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    shape = next(s for s in GPU_SHAPES if s.name == name)
    x, weight, bias = make_case(
        shape.batch, shape.in_channels, shape.out_channels, shape.height, shape.width,
        shape.kernel, True, torch.float32, "cuda", "channels_last",
    )  # fmt: skip
    out = ops.conv2d_relu(x, weight, bias, shape.padding)
    truth = torch_conv2d_relu(x.double(), weight.double(), bias.double(), shape.padding, True)
    assert_parity(out, torch_conv2d_relu(x, weight, bias, shape.padding, True), truth, floor=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_unet_shapes_bitwise_repeatable_on_gpu(dtype):
    for shape in GPU_SHAPES[::3]:
        x, weight, bias = make_case(
            shape.batch, shape.in_channels, shape.out_channels, shape.height, shape.width,
            shape.kernel, True, dtype, "cuda", "channels_last",
        )  # fmt: skip
        grad_out = torch.randn(shape.batch, shape.out_channels, shape.height, shape.width,
                               device="cuda")  # fmt: skip
        args = (x, weight, bias, shape.padding, shape.relu, grad_out)
        first = conv_relu_with_grads(ops.conv2d_relu, *args)
        second = conv_relu_with_grads(ops.conv2d_relu, *args)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b), shape.name


@pytest.mark.gpu
def test_a_tile_launched_past_the_autotuner_gives_its_bits_on_gpu(monkeypatch):
    """With two tiles to pick from (the one-tile fixture leaves one), the first launch of a key
    is tuned and the later ones launch the pick directly (`_launch`): the same bits, forward and
    every gradient, and the composite's values within PyTorch's own error."""
    for name, configs in AUTOTUNED_CONFIGS.items():
        monkeypatch.setattr(getattr(kernels.conv2d_relu, name), "configs", configs[-2:])
    x, weight, bias = make_case(2, 32, 48, 20, 18, 3, True, torch.float16, "cuda", "channels_last")
    grad_out = torch.randn(2, 48, 20, 18, device="cuda")
    first = conv_relu_with_grads(ops.conv2d_relu, x, weight, bias, 1, True, grad_out)
    again = conv_relu_with_grads(ops.conv2d_relu, x, weight, bias, 1, True, grad_out)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    check_against_float64(x, weight, bias, 1, True)


@pytest.mark.gpu
@pytest.mark.bigmem
def test_batch_beyond_int32_offsets_on_gpu():
    """An activation of more than 2**31 elements: batch offsets must be int64."""
    x = torch.randn(2**31 // (64 * 64 * 64) + 2, 64, 64, 64, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16) / 24
    out = ops.conv2d_relu(x, weight, None)
    tail = slice(-2, None)  # the images past the 2**31-element mark
    expected = torch_conv2d_relu(x[tail].float(), weight.float(), None, 1, True)
    assert relative_error(out[tail], expected) <= 1e-2


@pytest.mark.parametrize("launch", ["forward", "grad_input", "grad_weight", "relu_grad"])
def test_a_batch_beyond_int32_pixel_indices_is_refused(launch):
    """The kernels index a GEMM row, a pixel (n, h, w), in int32: 2**31 pixels or more would
    wrap, silently. Meta tensors: the launchers refuse before any memory or launch."""
    from fastunet.kernels import IndexRangeError
    from fastunet.kernels import conv2d_relu as launchers

    grad = torch.empty(2**17, 1, 2**7, 2**7, device="meta").to(memory_format=torch.channels_last)
    x, weight = grad, torch.empty(1, 1, 3, 3, device="meta")
    calls = {
        "forward": lambda: launchers.forward(x, weight, None, 1, True),
        "grad_input": lambda: launchers.grad_input(grad, weight, 2**7, 2**7, 1),
        "grad_weight": lambda: launchers.grad_weight(grad, x, 3, 3, 1),
        "relu_grad": lambda: launchers.relu_grad(grad, x),
    }
    # Its own class: a layer whose path is measured runs PyTorch's path on it (test_choice).
    with pytest.raises(IndexRangeError, match="131072 images of 128x128 are >= 2\\*\\*31 pixels"):
        calls[launch]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_leaky_relu_epilogue(backend, dtype):
    """negative_slope > 0: LeakyReLU in the epilogue and in the backward's mask, on both
    backends, against F.leaky_relu of the convolution in float64."""
    device = backend_device(backend)
    x, weight, bias = make_case(2, 5, 6, 7, 5, 3, True, dtype, device)
    grad_out = torch.randn(2, 6, 7, 5, device=device)

    def leaky(x, weight, bias):
        return F.leaky_relu(F.conv2d(x, weight, bias, padding=1), 0.2)

    ours = output_and_grads(ops.conv2d_relu, (x, weight, bias), grad_out, 1, True, 0.2)
    truth = output_and_grads(leaky, [t.double() for t in (x, weight, bias)], grad_out)
    theirs = output_and_grads(leaky, (x, weight, bias), grad_out)
    for name, got, expected, torch_got in zip(
        ["output", "grad_input", "grad_weight", "grad_bias"], ours, truth, theirs, strict=True
    ):
        if dtype == torch.float32:
            assert relative_error(got, expected) <= 1e-5, name
        else:
            assert_parity(got, torch_got, expected, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("negative_slope", [0.0, 0.1])
def test_activation_mask_equals_pytorchs_backward(backend, dtype, negative_slope):
    """The backward's mask bit for bit as PyTorch's: threshold_backward for ReLU (a NaN output
    passes the gradient), leaky_relu_backward for LeakyReLU (it scales it), -0.0 included."""
    device = backend_device(backend)
    out = torch.randn(3, 4, 5, 6, device=device, dtype=dtype)
    out.view(-1)[::7] = float("nan")
    out.view(-1)[1::11] = -0.0
    out = F.leaky_relu(out, negative_slope).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(out)
    grad, grad_bias = conv2d_relu_grad_output(grad_out, out, negative_slope)
    if negative_slope:
        expected = torch.ops.aten.leaky_relu_backward(grad_out, out, negative_slope, True)
    else:
        expected = torch.ops.aten.threshold_backward(grad_out, out, 0)
    assert torch.equal(grad, expected)
    torch.testing.assert_close(grad_bias, expected.float().sum((0, 2, 3)).to(dtype))


@pytest.mark.parametrize(
    "kernel_name,key,configs",
    [("_conv2d_kernel", "CONV_TUNING_KEY", "GEMM_CONFIGS"),
     ("_conv2d_grad_weight_kernel", "GRAD_WEIGHT_TUNING_KEY", "GRAD_WEIGHT_CONFIGS")],
)  # fmt: skip
def test_a_tile_is_tuned_for_each_compile_time_flag(kernel_name, key, configs):
    """Triton keys a tuned tile by the names given and the tensors' dtypes only: without the
    flags, a TF32 and an IEEE run, nearest and bilinear, or a forward and a same-shape grad_input
    shared one tile."""
    launchers = kernels.conv2d_relu
    function = getattr(launchers, kernel_name)
    while hasattr(function, "fn"):  # the autotuner's, the JIT's or the interpreter's wrapper
        function = function.fn
    flags = {name for name, parameter in inspect.signature(function).parameters.items()
             if "constexpr" in str(parameter.annotation)}  # fmt: skip
    tile = set(getattr(launchers, configs)[0].kwargs)
    assert flags - tile <= set(getattr(launchers, key))


@pytest.mark.parametrize("kernel_name,config", AUTOTUNED, ids=AUTOTUNED_IDS)
def test_every_autotuned_tile(kernel_name, config, monkeypatch):
    """Each tile on a shape that no tile divides: 286 output pixels, 67 input channels, 37
    output channels."""
    force_tile(monkeypatch, kernel_name, config)
    for dtype in tile_dtypes(config):
        assert_kernel_backend("conv2d_relu", KERNEL_DEVICE, dtype)
        x, weight, bias = make_case(2, 67, 37, 13, 11, 3, True, dtype, KERNEL_DEVICE,
                                    "channels_last")  # fmt: skip
        check_against_float64(x, weight, bias, 1, True)


def test_host_grid_arithmetic_matches_tritons():
    """kernels.cdiv and kernels.next_power_of_2 stand in for Triton's on the host, where each
    call of those costs microseconds."""
    import triton

    sizes = [*range(0, 300), 2**31 - 1, 2**31, 3 * 2**40 + 5]
    for a in sizes:
        for b in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert kernels.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in [*range(1, 5000), 2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40]:
        assert kernels.next_power_of_2(n) == triton.next_power_of_2(n), n


def test_a_tuned_launch_runs_the_picked_tile_without_the_autotuner():
    """Triton's Autotuner.run costs 27-30 us of host time a launch; once it has picked a tile
    for a key, the launchers launch that tile directly. Without a GPU (tests/tuned_launches.py):
    the first launch of each key (shape, flags, dtype) goes through the autotuner, which times
    each tile and launches its pick; the same key again makes exactly the autotuner's final
    call (arguments, grid, warmup off, every keyword) and nothing else; a kernel given one
    config (as tests force a tile) runs it; a replaced config list goes back through the
    autotuner; two threads' first launches of two keys each keep their own pick."""
    script = Path(__file__).with_name("tuned_launches.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    launches = {line["launch"]: line for line in lines if "launch" in line}
    for kernel in ("forward fp16", "grad_weight fp16"):
        first, again = launches[f"{kernel} first"], launches[f"{kernel} again"]
        assert first["autotuner_calls"] == 1 and len(first["runs"]) > 2, first  # timed, then ran
        assert again["autotuner_calls"] == 0 and again["runs"] == first["runs"][-1:], again
        assert again["runs"][0]["warmup"] is False
    for other in ("forward fp16 with bias", "forward fp32", "forward fp16, other width"):
        assert launches[other]["autotuner_calls"] == 1 and len(launches[other]["runs"]) > 2, other
    one_tile = launches["forward fp16, one tile"]
    assert one_tile["autotuner_calls"] == 0
    last_tile, threads = lines[-2:]
    assert [run["tile"] for run in one_tile["runs"]] == [last_tile["last_tile"]]
    assert launches["forward fp16, new list"]["autotuner_calls"] == 1
    assert threads["after_threads"] == threads["alone"]
    assert threads["alone"]["256"] != threads["alone"]["16"]


def test_axis_tables_are_fp32_whatever_the_default_dtype():
    """The kernels read the upsampling weights as fp32; a weight table made with the default
    dtype turned fp64 under torch.set_default_dtype(torch.float64)."""
    from fastunet.kernels.upsample_concat import axis_tables

    default = torch.get_default_dtype()
    axis_tables.cache_clear()
    torch.set_default_dtype(torch.float64)
    try:
        tables = [axis_tables(4, out, mode, False, torch.device("cpu"))
                  for out, mode in ((8, "nearest"), (4, "bilinear"), (7, "bilinear"))]  # fmt: skip
    finally:
        torch.set_default_dtype(default)
        axis_tables.cache_clear()
    for table in tables:
        assert table.lambda0.dtype == table.lambda1.dtype == torch.float32
