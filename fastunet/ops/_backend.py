"""Which implementation serves an op call.

The choice is made per call from the tensor's device and dtype and the environment, so one model
can run on CPU and GPU in the same process. Nothing above the op layer knows which backend ran.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass

import torch

from fastunet.kernels import INTERPRET as TRITON_INTERPRET

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The ops and the kind of kernel that serves them on a GPU.
TRITON_OPS = ("conv2d_relu", "upsample_concat", "upsample_concat_conv2d_relu")
NATIVE_OPS = ("max_pool2d",)
OPS = TRITON_OPS + NATIVE_OPS


@dataclass(frozen=True)
class Backend:
    # "triton", "triton-interpreter", "_C.cuda", "_C.cpu", "torch", or "unsupported" (a GPU
    # that _C has no code for: the reason says how to build for it)
    name: str
    reason: str

    @property
    def is_triton(self) -> bool:
        return self.name.startswith("triton")


FORCED_BACKENDS = ("auto", "fastunet", "torch")


def forced_backend() -> str:
    """FASTUNET_BACKEND: unset or "auto" picks per layer (see `fastunet.ops._choice`) and per
    call; "fastunet" runs fastunet's ops on every layer, without measuring; "torch" runs them
    with the torch composite inside, everywhere (for bisecting)."""
    value = os.environ.get("FASTUNET_BACKEND", "auto").strip().lower() or "auto"
    if value not in FORCED_BACKENDS:
        raise ValueError(
            f"FASTUNET_BACKEND={value!r} is not understood; use one of {', '.join(FORCED_BACKENDS)}"
        )
    return value


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def triton_kernels_error() -> str | None:
    """Why the Triton kernels cannot be imported, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    return None


@functools.cache
def native_extension():
    """The `fastunet._C` module, or the reason it is missing as a string."""
    try:
        from fastunet import _C
    except ImportError as error:
        return f"the _C extension is not built ({error})"
    return _C


@functools.cache
def native_build_info() -> dict | None:
    """What `_C` was built with (CUDA or not, archs, nvcc, why no CUDA); None if not built."""
    ext = native_extension()
    return None if isinstance(ext, str) else ext.build_info()


# The usual answers, made once: a layer asks on every call.
FORCED_TORCH = Backend("torch", "forced by FASTUNET_BACKEND=torch")
TRITON = Backend("triton", "CUDA tensor: Triton kernel")
TRITON_INTERPRETER = Backend("triton-interpreter", "CPU tensor with TRITON_INTERPRET=1")
NATIVE_CUDA = Backend("_C.cuda", "CUDA tensor: _C CUDA kernel")
NATIVE_CPU = Backend("_C.cpu", "CPU tensor: _C C++ twin")


def choose(op: str, device: torch.device | str, dtype: torch.dtype) -> Backend:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if forced_backend() == "torch":
        return FORCED_TORCH
    if dtype not in KERNEL_DTYPES:
        return Backend("torch", f"{dtype} has no kernel (kernels serve fp32, fp16 and bf16)")
    device = torch.device(device)
    if op in TRITON_OPS:
        return _choose_triton(device, dtype)
    return _choose_native(device)


def _choose_triton(device: torch.device, dtype: torch.dtype) -> Backend:
    if device.type == "cuda":
        error = triton_kernels_error()
        return TRITON if error is None else Backend("torch", f"CUDA tensor, but {error}")
    if device.type == "cpu" and TRITON_INTERPRET:
        if dtype == torch.bfloat16:  # its arithmetic on bf16 values gives garbage, not an error
            return Backend("torch", "TRITON_INTERPRET=1, but Triton's interpreter has no bfloat16")
        error = triton_kernels_error()
        if error is None:
            return TRITON_INTERPRETER
        return Backend("torch", f"TRITON_INTERPRET=1, but {error}")
    return Backend(
        "torch",
        f"{device.type} tensor: torch composite "
        "(TRITON_INTERPRET=1 before import runs the Triton kernels on CPU)",
    )


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def missing_arch(capability: tuple[int, int], archs: list[str]) -> str | None:
    """Why code built for `archs` (["sm_80", "compute_90"]) cannot run on a GPU of this compute
    capability, or None when it can: machine code sm_XY runs on the same major version from
    minor Y up; PTX compute_XY is compiled by the driver for any GPU from XY up."""
    major, minor = capability
    here = 10 * major + minor
    for arch in archs:
        kind, number = arch.split("_")
        built = int(number)
        if (kind == "sm" and built // 10 == major and built <= here) or (
            kind == "compute" and built <= here
        ):
            return None
    return (
        f"this GPU is sm_{here}, but fastunet._C was built for {' '.join(archs)}: build it for "
        f"this GPU with FASTUNET_CUDA_ARCHS={here} pip install <fastunet's source tree or sdist> "
        "(or set FASTUNET_BACKEND=torch to run the torch composite)"
    )


def _choose_native(device: torch.device) -> Backend:
    ext = native_extension()
    if isinstance(ext, str):
        return Backend("torch", ext)
    if device.type == "cuda":
        info = native_build_info()
        if not info["cuda"]:
            return Backend("torch", f"CUDA tensor, but _C was built without CUDA: {info['reason']}")
        missing = missing_arch(_capability(device), info["archs"])
        if missing:
            return Backend("unsupported", missing)
        return NATIVE_CUDA
    if device.type == "cpu":
        return NATIVE_CPU
    return Backend("torch", f"{device.type} tensor: torch composite")
