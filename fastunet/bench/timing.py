"""Timing, peak memory and the device's own ceilings.

Times come from `fastunet.ops._timing.compare_ms`: on CUDA, medians of CUDA-event timings from
`triton.testing.do_bench` (which also flushes L2 between runs), after its warm-up; on the CPU,
wall-clock medians with the candidates taking turns. Every call takes the next of several input
sets, so the cache is not what is measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastunet.ops._timing import compare_ms as compare_ms  # the op layer times its choices too


def peak_memory_mb(step: Callable[[int], object], device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated over one step(0), in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def ceilings(device: torch.device) -> dict:
    """The bf16 matmul rate (TFLOP/s) and copy bandwidth (GB/s, read + write) of this device."""
    if device.type != "cuda":
        return {"matmul_tflops": None, "copy_gbps": None, "reason": "ceilings need a CUDA device"}
    from triton.testing import do_bench

    n, copy_bytes = 8192, 2**30
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    with torch.cuda.device(device):  # do_bench's events and L2 flush use the current device
        matmul_ms = do_bench(lambda: torch.matmul(a, b), return_mode="median")
        copy_ms = do_bench(lambda: target.copy_(source), return_mode="median")
    return {
        "matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
        "copy_gbps": 2 * copy_bytes / copy_ms / 1e6,
        "matmul": f"bf16 {n}x{n}x{n} torch.matmul on random data",
        "copy": "1 GiB device-to-device copy, bytes read + written",
    }
