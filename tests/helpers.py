"""Helpers shared by the kernel tests (importable because pytest puts tests/ on sys.path)."""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from packaging.version import Version

from fastunet.bench.parity import relative_error
from fastunet.kernels import INTERPRET
from fastunet.kernels import conv2d_relu as conv2d_relu_kernels
from fastunet.ops._backend import choose

# The device whose tensors the Triton kernels serve in this session: the GPU if there is one,
# else the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# A UNet of depth d's input axis, drawn as 2**d * multiple + extra: extra 0 makes every level an
# exact 2x of the next (where PyTorch's paths have shortcuts), extra > 0 odd sizes, whose pooling
# drops a row or column and whose upsampling is not 2x.
UNET_AXIS = st.tuples(st.integers(1, 4), st.just(0) | st.integers(1, 5))
UNET_AXES = st.tuples(UNET_AXIS, UNET_AXIS)
# (mode, align_corners) of an upsampling, and the memory layouts `in_layout` makes.
UPSAMPLE_MODES = st.sampled_from([("nearest", False), ("bilinear", False), ("bilinear", True)])
INPUT_LAYOUTS = st.sampled_from(["contiguous", "channels_last", "strided", "permuted"])


def unet_size(depth: int, axes) -> list[int]:
    """The (H, W) that UNET_AXES drew for a UNet of this depth."""
    return [2**depth * multiple + extra for multiple, extra in axes]


# Under the interpreter there is no bfloat16.
KERNEL_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if KERNEL_DEVICE == "cuda" else []
)


def backend_device(backend: str) -> str:
    """Where a test of the `backend` fixture puts its tensors: the kernels' device, or the CPU
    for the composite."""
    return KERNEL_DEVICE if backend == "kernels" else "cpu"


def interpreter_problem(interpret: bool, triton: str | None, numpy: str | None) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None. Triton
    before 3.8 fails under numpy >= 2.4 with an InterpreterError in every kernel test
    (triton-lang/triton#9171). Without the interpreter (on a GPU) the versions do not matter."""
    if not (interpret and triton and numpy):
        return None
    if Version(triton).release[:2] >= (3, 8) or Version(numpy).release[:2] < (2, 4):
        return None
    return (
        f"Triton {triton}'s interpreter, which runs the kernel tests without a GPU "
        f"(TRITON_INTERPRET=1), fails with numpy {numpy} (numpy >= 2.4 needs Triton >= 3.8, "
        'triton-lang/triton#9171). Fix: pip install "numpy<2.4", or pip install "triton>=3.8".'
    )


def assert_kernel_backend(op: str, device, dtype) -> None:
    """Fail, not skip, when the op would silently run the torch composite instead."""
    backend = choose(op, device, dtype)
    assert backend.is_triton, f"{op} on {device} {dtype} runs {backend.name}: {backend.reason}"


def assert_parity(ours, torch_same_dtype, truth, name="", floor=1e-6):
    """flash-attention's rule: our error against the float64 truth is at most 2x PyTorch's own
    error in the same dtype (plus a floor for when PyTorch happens to be exact)."""
    error, torch_error = relative_error(ours, truth), relative_error(torch_same_dtype, truth)
    assert error <= 2 * torch_error + floor, (
        f"{name}: error {error:.3e} > 2 x PyTorch's {torch_error:.3e} + {floor:g}"
    )


# Every tile the conv kernels' autotuners can pick, to be forced one at a time: the other tests
# see one tile per shape (the interpreter's, or on a GPU autotune's pick for that shape), so a
# slip that only one tile makes (a mask at its edge, the skip/x boundary inside a channel block,
# grad_weight's reduction split) shows only where autotune happens to pick that tile.
AUTOTUNED_CONFIGS = {
    "_conv2d_kernel": conv2d_relu_kernels.GEMM_CONFIGS,
    "_conv2d_grad_weight_kernel": conv2d_relu_kernels.GRAD_WEIGHT_CONFIGS,
}
AUTOTUNED = [(name, c) for name, configs in AUTOTUNED_CONFIGS.items() for c in configs]
AUTOTUNED_IDS = [
    "{}-{BLOCK_M}x{BLOCK_N}x{BLOCK_K}-w{}-s{}".format(
        "grad_weight" if "grad_weight" in name else "conv", c.num_warps, c.num_stages, **c.kwargs
    )
    for name, c in AUTOTUNED
]


def force_tile(monkeypatch, kernel_name: str, config) -> None:
    """Make the kernel run `config`. On a GPU, as its autotuner's only config (which runs
    untimed), and the other conv kernel runs its last config: each further config autotune
    tried would be one more compile (about a second) per dtype and variant. The interpreter has
    no autotuner: there `config`'s tile is the tile of both conv kernels."""
    if INTERPRET:
        tile = {name: config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        monkeypatch.setattr(conv2d_relu_kernels, "INTERPRETER_TILES", tile)
        return
    for name, configs in AUTOTUNED_CONFIGS.items():
        only = config if name == kernel_name else configs[-1]
        monkeypatch.setattr(getattr(conv2d_relu_kernels, name), "configs", [only])


def tile_dtypes(config) -> list[torch.dtype]:
    """The kernel dtypes autotune may run config in: those whose pipeline fits shared memory
    (a GPU's limit; the tile's channel sizes are no limit here). In the interpreter, where a
    tile's logic does not depend on the dtype and every example takes seconds, only the first."""
    dtypes = [d for d in KERNEL_DTYPES
              if conv2d_relu_kernels._fits(config, 1 << 16, 1 << 16, d.itemsize)]  # fmt: skip
    assert dtypes, f"{config} fits no dtype: autotune could never pick it"
    return dtypes[:1] if INTERPRET else dtypes


def poison_allocations(monkeypatch):
    """NaN-fill every new floating-point tensor, so an element a kernel never writes shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


# PyTorch's own composites: what each fastunet op must equal.


def torch_conv2d_relu(x, weight, bias, padding, relu, negative_slope=0.0):
    out = F.conv2d(x, weight, bias, padding=padding)
    if not relu:
        return out
    return F.leaky_relu(out, negative_slope) if negative_slope else F.relu(out)


def torch_upsample_concat(x, skip, mode, align_corners, skip_first=True):
    kwargs = {} if mode == "nearest" else {"align_corners": align_corners}
    up = F.interpolate(x, size=skip.shape[-2:], mode=mode, **kwargs)
    return torch.cat([skip, up] if skip_first else [up, skip], 1)


def output_and_grads(function, inputs, grad_out, *args):
    """[out, grad of each input] of function(*inputs, *args) given grad_out (cast to out's
    dtype), by autograd on fresh leaves; an input of None has a gradient of None."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = function(*leaves, *args)
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, given, grad_out.to(out.dtype)))
    return [out.detach(), *(None if t is None else next(grads) for t in leaves)]


def in_layout(t, layout):
    """t's values stored "contiguous", "channels_last" (4-D), "strided" (a view at a storage
    offset, every other element of a NaN-filled buffer, so a read outside the view shows) or
    "permuted" (dense, dims stored in reverse order: neither NCHW nor channels_last)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        buffer = torch.full([2 * s + 1 for s in t.shape], float("nan"), dtype=t.dtype,
                            device=t.device)  # fmt: skip
        return buffer[(slice(1, None, 2),) * t.dim()].copy_(t)
    if layout == "permuted":
        reverse = list(reversed(range(t.dim())))
        return t.permute(reverse).contiguous().permute(reverse)
    raise ValueError(f"unknown layout {layout!r}")


INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(actual, expected):
    """Bit for bit (+0.0 is not -0.0), except that any NaN matches any NaN: PyTorch's fp16 and
    bf16 max-pool re-encode a NaN's payload, where _C copies the input's bits."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    ints = INTS[actual.element_size()]
    assert torch.equal(
        actual.view(ints).masked_fill(nan, 0), expected.view(ints).masked_fill(nan, 0)
    )


def drawn(max_examples: int) -> settings:
    """The property tests' hypothesis settings: derandomized (every run draws the same
    examples), no deadline (the interpreter is slow), no example database, and function-scoped
    fixtures allowed (set once per test, which is what each example wants)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
