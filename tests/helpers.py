"""Helpers shared by the kernel tests (importable because pytest puts tests/ on sys.path)."""

import torch
import torch.nn.functional as F
from packaging.version import Version

from fastunet.bench.parity import relative_error
from fastunet.ops._backend import choose

# The device whose tensors the Triton kernels serve in this session: the GPU if there is one,
# else the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def poison_allocations(monkeypatch):
    """NaN-fill every new floating-point tensor, so an element a kernel never writes shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


# PyTorch's own composites: what each fastunet op must equal.


def torch_conv2d_relu(x, weight, bias, padding, relu):
    out = F.conv2d(x, weight, bias, padding=padding)
    return F.relu(out) if relu else out


def torch_upsample_concat(x, skip, mode, align_corners):
    kwargs = {} if mode == "nearest" else {"align_corners": align_corners}
    return torch.cat([skip, F.interpolate(x, size=skip.shape[-2:], mode=mode, **kwargs)], 1)


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
