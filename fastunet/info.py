"""`fastunet.info()`: versions, device, the native extension, each op's backend and why, and
how each layer's path is chosen."""

from __future__ import annotations

import os
import platform

import torch

from fastunet._version import __version__
from fastunet.ops import _backend, _choice

OPS = _backend.TRITON_OPS + _backend.NATIVE_OPS


def _native_extension() -> dict:
    built = _backend.native_build_info()
    if built is None:
        reason = _backend.native_extension()
        return {"built": False, "cuda": False, "archs": [], "nvcc": None, "reason": reason}
    return {"built": True, **built}


def cpu_name() -> str:
    """The CPU's model (`cpu_model`) and the cores this process may run on (hyperthreads count),
    not the machine's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name, flags = _choice.cpu_model()
    return ", ".join([name, f"{cores or '?'} cores", *flags])


def cuda_missing() -> str | None:
    """Why CUDA cannot run here, or None where it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) was built without CUDA"
    return "PyTorch sees no CUDA GPU (no driver, or CUDA_VISIBLE_DEVICES hides them)"


def info(device: torch.device | str | None = None) -> dict:
    """What fastunet will run on `device` (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if why := cuda_missing():  # else PyTorch's bare AssertionError, or a driver error
            raise RuntimeError(f"fastunet.info({str(device)!r}): {why}")
        device_name = torch.cuda.get_device_name(device)
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    elif device.type == "cpu":
        device_name, capability = cpu_name(), None
    else:  # meta (shapes without data) or another device: not the CPU that cpu_name() names
        device_name, capability = f"{device.type} device", None
    return {
        "fastunet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _backend.package_version("triton"),
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
        "device_name": device_name,
        "compute_capability": capability,
        "triton_interpret": _backend.TRITON_INTERPRET,
        "forced_backend": _backend.forced_backend(),
        "native_extension": _native_extension(),
        "ops": {op: vars(_backend.choose(op, device, torch.float32)) for op in OPS},
        "layer_choice": _choice.describe(device),
    }


def format_info(report: dict) -> str:
    """The report as aligned text for the terminal."""
    lines = [
        f"fastunet {report['fastunet']}  python {report['python']}  torch {report['torch']}  "
        f"triton {report['triton'] or 'not installed'}  CUDA runtime {report['cuda_runtime']}",
        f"device: {report['device']} ({report['device_name']}"
        + (f", {report['compute_capability']})" if report["compute_capability"] else ")"),
        f"TRITON_INTERPRET: {int(report['triton_interpret'])}  "
        f"FASTUNET_BACKEND: {report['forced_backend']}",
    ]
    ext = report["native_extension"]
    if not ext["built"]:
        lines.append(f"_C: {ext['reason']}")
    elif ext["cuda"]:
        lines.append(f"_C: CPU twin and CUDA for {', '.join(ext['archs'])}, nvcc {ext['nvcc']}")
    else:
        lines.append(f"_C: CPU twin only ({ext['reason']})")
    lines.append("ops:")
    width = max(len(op) for op in report["ops"])
    for op, backend in report["ops"].items():
        lines.append(f"  {op:<{width}}  {backend['name']:<18}  {backend['reason']}")
    choice = report["layer_choice"]
    lines.append(
        "layers: " + (choice["rule"] or "fastunet op or PyTorch's own path, measured per layer")
    )
    lines.append(f"  UNet's activations: {choice['unet_layout']}")
    cached = "; ".join(
        f"{kind}: " + ", ".join(f"{count} {path}" for path, count in taken.items())
        for kind, taken in choice["cached"].items()
    )
    lines.append(f"  choice cache: {choice['cache_file']} ({cached})")
    return "\n".join(lines)
