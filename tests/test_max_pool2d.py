"""fastunet.ops.max_pool2d on `fastunet._C` against PyTorch's max-pool, bit for bit.

CPU tier: the C++ twin, which runs the CUDA kernels' per-vector code, and the .cu sources compile
with nvcc. GPU tier (`gpu`): the CUDA kernels at UNet shapes, a tensor over 2**31 elements,
CUDA graphs, and compute-sanitizer.
"""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

from fastunet import ops
from fastunet.ops import _backend
from fastunet.ops._common import memory_format_of
from fastunet.ops.max_pool2d import _run_native, max_pool2d_backward

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NAN, INF = float("nan"), float("inf")


def native():
    """`fastunet._C`. Its absence fails rather than skips: every install builds the CPU twin."""
    ext = _backend.native_extension()
    assert not isinstance(ext, str), ext
    return ext


def assert_native_backend(device, dtype):
    expected = "_C.cuda" if torch.device(device).type == "cuda" else "_C.cpu"
    assert _backend.choose("max_pool2d", device, dtype).name == expected


def make(shape, dtype, layout, values, device, seed):
    """Fresh random values, or "special" ones: small integers (so ties, +0 against -0 among
    them) with NaN, inf, -inf and -0.0 sprinkled in."""
    g = torch.Generator(device).manual_seed(seed)
    if values == "random":
        x = torch.randn(shape, generator=g, device=device)
    else:
        x = torch.randint(-2, 3, shape, generator=g, device=device).float()
        kind = torch.randint(0, 10, shape, generator=g, device=device)
        for k, value in enumerate([NAN, INF, -INF, -0.0]):
            x[kind == k] = value
    return x.to(dtype).contiguous(memory_format=layout)


def misaligned(x, offset):
    """x's values, dense in x's layout, `offset` elements past an aligned address."""
    storage = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    return storage[offset:].as_strided(x.shape, x.stride()).copy_(x)


def reference(x, grad):
    """PyTorch's output, the window position of its index, and its input gradient."""
    out, index = F.max_pool2d_with_indices(x, 2)
    grad_in = torch.ops.aten.max_pool2d_with_indices_backward(
        grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index
    )
    width = x.shape[-1]
    position = index // width % 2 * 2 + index % width % 2
    return out, position.to(torch.uint8), grad_in


def ours(x, grad):
    x = x.detach().requires_grad_()
    out, argmax = ops.max_pool2d_with_argmax(x)
    (grad_in,) = torch.autograd.grad(out, x, grad)
    return out, argmax, grad_in


def check_against_pytorch(x, grad):
    assert_native_backend(x.device, x.dtype)
    out, argmax, grad_in = ours(x, grad)
    expected_out, expected_argmax, expected_grad_in = reference(x, grad)
    assert_same_bits(out, expected_out)
    assert torch.equal(argmax, expected_argmax)
    assert_same_bits(grad_in, expected_grad_in)
    layout = memory_format_of(x)
    assert out.is_contiguous(memory_format=layout)
    assert argmax.is_contiguous(memory_format=layout)


# --- CPU tier, and the same on CUDA in the GPU tier ------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 3),
    c=st.integers(1, 17),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    values=st.sampled_from(["random", "special"]),
    view=st.sampled_from(["dense", "strided", "misaligned"]),
    grad_layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_pytorch(device, n, c, h, w, dtype, layout, values, view, grad_layout, seed):
    if view == "strided":  # every other column of a wider tensor
        x = make((n, c, h, 2 * w), dtype, layout, values, device, seed)[..., ::2]
    else:
        x = make((n, c, h, w), dtype, layout, values, device, seed)
        if view == "misaligned":
            x = misaligned(x, 1 + seed % 3)
    grad = make((n, c, h // 2, w // 2), dtype, grad_layout, values, device, seed + 1)
    check_against_pytorch(x, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 8, 3, 3), (2, 16, 2, 9), (1, 1, 9, 2)])
def test_odd_sizes_drop_the_last_row_and_column(device, dtype, layout, shape):
    x = make(shape, dtype, layout, "random", device, 0)
    grad = make((*shape[:2], shape[2] // 2, shape[3] // 2), dtype, layout, "random", device, 1)
    check_against_pytorch(x, grad)


# One window per channel: its four values (row-major) and the position that must win.
WINDOWS = [
    ([1.0, 3.0, 3.0, 2.0], 1),  # a tie keeps the first position
    ([-INF, -INF, -INF, -INF], 0),  # nothing beats -inf: position 0
    ([-INF, -INF, -5.0, -INF], 2),
    ([NAN, 1.0, NAN, 2.0], 2),  # NaN wins, the last NaN most
    ([NAN, NAN, NAN, NAN], 3),
    ([-0.0, 0.0, -1.0, -1.0], 0),  # -0.0 == +0.0: a tie, so the output is -0.0
    ([0.0, -0.0, -1.0, -1.0], 0),
    ([1.0, INF, 2.0, INF], 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_tie_and_inf_rules(device, dtype, layout):
    values = torch.tensor([window for window, _ in WINDOWS]).view(1, len(WINDOWS), 2, 2)
    x = values.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    out, argmax = ops.max_pool2d_with_argmax(x)
    expected = torch.tensor([position for _, position in WINDOWS], dtype=torch.uint8)
    assert torch.equal(argmax.flatten().cpu(), expected)
    # A gradient of -0.0 lands as +0.0, as PyTorch's (it adds into zeros).
    grad = torch.tensor([2.0, -0.0, NAN, INF, -1.0, -0.0, 3.0, 4.0], device=device)
    check_against_pytorch(x, grad.to(dtype).view_as(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_16_bit_pattern(device, dtype, layout):
    """Windows of 4 consecutive bit patterns, and of 4 random ones, over all 65536: the fp16 and
    bf16 decoding (zeros, subnormals, inf, NaN) orders values as PyTorch does."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    consecutive = patterns.unfold(0, 4, 1)
    shuffled = patterns[torch.randperm(patterns.numel())].view(-1, 4)
    windows = torch.cat([consecutive, shuffled]).view(1, -1, 2, 2)
    x = windows.to(device).contiguous(memory_format=layout)
    check_against_pytorch(x, torch.randn(x.shape[:2], device=device).to(dtype).view(1, -1, 1, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape,offset",
    # Channels 8, 16, 6 and 3 and a misaligned address: every vector width of the kernels.
    [
        ((2, 8, 7, 9), 0),
        ((3, 16, 5, 6), 0),
        ((2, 6, 4, 5), 0),
        ((2, 3, 6, 5), 0),
        ((2, 8, 6, 6), 2),
    ],
)
def test_C_writes_every_element(device, dtype, layout, shape, offset):
    """Call _C on outputs poisoned with NaN and 255, so an element it does not write fails."""
    native()
    assert_native_backend(device, dtype)
    x = misaligned(make(shape, dtype, layout, "random", device, 0), offset)
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    out = torch.full(pooled, NAN, dtype=dtype, device=device).contiguous(memory_format=layout)
    argmax = torch.full_like(out, 255, dtype=torch.uint8)
    _run_native("max_pool2d_forward", x, x.data_ptr(), out.data_ptr(), argmax.data_ptr())

    grad = make(pooled, dtype, layout, "random", device, 1)
    grad_in = misaligned(torch.full_like(x, NAN), offset)
    _run_native(
        "max_pool2d_backward", grad_in, grad.data_ptr(), argmax.data_ptr(), grad_in.data_ptr()
    )

    expected_out, expected_argmax, expected_grad_in = reference(x, grad)
    assert_same_bits(out, expected_out)
    assert torch.equal(argmax, expected_argmax)
    assert_same_bits(grad_in, expected_grad_in)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_twin_splits_rows_across_threads(threads, layout, monkeypatch):
    """Enough rows for several threads (an odd count too): the same bits as one thread."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = make((2, 16, 131, 129), torch.float32, layout, "special", "cpu", seed=3)
    check_against_pytorch(x, make((2, 16, 65, 64), torch.float32, layout, "random", "cpu", 4))


@pytest.mark.parametrize("device", DEVICES)
def test_saves_one_byte_per_output_element_for_backward(device):
    x = make((2, 16, 9, 10), torch.bfloat16, torch.channels_last, "random", device, 0)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.max_pool2d(x)
    assert sum(saved) == out.numel()
    out.backward(torch.ones_like(out))
    assert x.grad.sum().item() == out.numel()


def test_C_rejects_what_it_cannot_address():
    x = torch.randn(2, 3, 6, 8)
    with pytest.raises(ValueError, match="dense NCHW or channels_last"):
        _run_native("max_pool2d_forward", x[..., ::2], x.data_ptr(), 0, 0)
    with pytest.raises(ValueError, match="H, W >= 2"):
        _run_native("max_pool2d_forward", x[:, :, :1], x.data_ptr(), 0, 0)
    argmax = torch.zeros(2, 3, 3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pooled shape of an input of height 6 and width 9"):
        max_pool2d_backward(torch.randn(2, 3, 3, 5), argmax, 6, 9)
    with pytest.raises(ValueError, match="argmax must be uint8"):
        max_pool2d_backward(torch.randn(2, 3, 3, 4), argmax.long(), 6, 8)


def test_build_info_describes_the_build():
    info = native().build_info()
    assert set(info) == {"cuda", "archs", "nvcc", "reason"}
    if info["cuda"]:
        assert info["archs"] and all(re.fullmatch(r"(sm|compute)_\d+", a) for a in info["archs"])
        assert re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc"]) and info["reason"] == ""
    else:
        assert info["archs"] == [] and info["nvcc"] is None and info["reason"]


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed (CUDA_HOME, PATH)")
def test_cuda_sources_compile(tmp_path):
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources
    for source in sources:
        result = subprocess.run(
            [find_nvcc(), "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"),
             "-std=c++17", "-arch=sm_75", "--Werror", "all-warnings"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


# --- GPU tier ---------------------------------------------------------------------------------

UNET_LEVELS = [(64, 256), (128, 128), (256, 64), (512, 32), (1024, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("channels,size", UNET_LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_pytorch_at_unet_shapes(channels, size, dtype, layout):
    x = make((16, channels, size, size), dtype, layout, "random", "cuda", channels)
    grad = make((16, channels, size // 2, size // 2), dtype, layout, "random", "cuda", size)
    check_against_pytorch(x, grad)


@pytest.mark.gpu
@pytest.mark.bigmem
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_tensor_over_2_31_elements(layout):
    shape = (4, 128, 2050, 2049)  # odd W: the last column is dropped
    assert math.prod(shape) > 2**31
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda", memory_format=layout).normal_()
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    grad = torch.empty(pooled, dtype=torch.bfloat16, device="cuda", memory_format=layout).normal_()
    assert_native_backend("cuda", torch.bfloat16)
    out, argmax, grad_in = ours(x, grad)
    for n in range(shape[0]):  # PyTorch one image at a time, each under 2**31 elements
        expected_out, expected_argmax, expected_grad_in = reference(x[n : n + 1], grad[n : n + 1])
        assert_same_bits(out[n : n + 1], expected_out)
        assert torch.equal(argmax[n : n + 1], expected_argmax)
        assert_same_bits(grad_in[n : n + 1], expected_grad_in)


@pytest.mark.gpu
def test_cuda_runs_on_torchs_current_stream_and_in_a_cuda_graph():
    x = make((4, 64, 32, 30), torch.bfloat16, torch.channels_last, "random", "cuda", 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: loads the kernel before the capture
        ops.max_pool2d(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a launch on any other stream breaks the capture
        out = ops.max_pool2d(x)
    x.copy_(make(x.shape, x.dtype, torch.channels_last, "random", "cuda", 1))
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(out, F.max_pool2d(x, 2))


@pytest.mark.gpu
def test_cuda_errors_raise_with_cudas_message():
    _C = native()
    x = torch.randn(1, 2, 4, 4, device="cuda")
    out = torch.empty(1, 2, 2, 2, device="cuda")
    argmax = torch.empty(1, 2, 2, 2, device="cuda", dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        _C.max_pool2d_forward_cuda(
            x.data_ptr(), out.data_ptr(), argmax.data_ptr(), x.shape, x.stride(),
            _C.DType.float32, torch.cuda.device_count(), 0,
        )  # fmt: skip
    # The failed call was left as the CUDA runtime's last error, and the next launch reported it.
    assert torch.equal(ops.max_pool2d(x), F.max_pool2d(x, 2))


SANITIZED_SCRIPT = """
import torch
from fastunet import ops
from fastunet.ops import _backend

shapes = [(2, 8, 7, 9), (1, 3, 5, 4), (2, 16, 6, 6), (1, 6, 3, 2)]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    assert _backend.choose("max_pool2d", "cuda", dtype).name == "_C.cuda"
    inputs = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    inputs += [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    # channels_last one element past an aligned address: the narrowest vectors
    storage = torch.randn(2 * 8 * 7 * 9 + 1, device="cuda", dtype=dtype)
    inputs.append(storage[1:].view(2, 7, 9, 8).permute(0, 3, 1, 2))
    for x in inputs:
        x.requires_grad_()
        out = ops.max_pool2d(x)
        out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("max-pool kernels ran")
"""


def find_compute_sanitizer() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    beside_cuda = os.path.join(home, "bin", "compute-sanitizer")
    return shutil.which("compute-sanitizer") or shutil.which(beside_cuda)


@pytest.mark.gpu
@pytest.mark.skipif(find_compute_sanitizer() is None, reason="compute-sanitizer is not installed")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_finds_no_errors(tool, tmp_path):
    script = tmp_path / "max_pool2d.py"
    script.write_text(SANITIZED_SCRIPT)
    # Without torch's caching allocator every tensor is its own allocation, so memcheck sees
    # an access past the end of one.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    result = subprocess.run(
        [find_compute_sanitizer(), "--tool", tool, "--error-exitcode", "1", sys.executable,
         str(script)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "max-pool kernels ran" in output
    assert re.search(r"SUMMARY: 0 (errors|hazards)", output), output
