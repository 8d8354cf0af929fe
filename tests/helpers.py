"""Helpers shared by the kernel tests (importable because pytest puts tests/ on sys.path)."""

import torch

from fastunet.bench.parity import relative_error
from fastunet.ops._backend import choose

# The device whose tensors the Triton kernels serve in this session: the GPU if there is one,
# else the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Under the interpreter there is no bfloat16.
KERNEL_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if KERNEL_DEVICE == "cuda" else []
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
