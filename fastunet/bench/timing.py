"""Timing, peak memory and the device's own ceilings.

On CUDA, times are medians of CUDA-event timings from `triton.testing.do_bench` (which also
flushes L2 between runs), after its warm-up, with every call taking the next of several input
sets so the cache is not what is measured. On the CPU, a few wall-clock repeats.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch


def median_ms(
    step: Callable[[int], object],
    input_sets: int,
    device: torch.device,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> float:
    """Median milliseconds of step(i), i cycling over range(input_sets); on CUDA, after warmup_ms
    of warm-up and over about rep_ms of repeats (raise both for steps of tens of ms)."""
    rotation = itertools.cycle(range(input_sets))
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(
            do_bench(
                lambda: step(next(rotation)), warmup=warmup_ms, rep=rep_ms, return_mode="median"
            )
        )
    for _ in range(input_sets):  # warm-up: one-time costs stay out of the numbers
        step(next(rotation))
    times = []
    deadline = time.perf_counter() + 0.5
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 20):
        start = time.perf_counter()
        step(next(rotation))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    matmul_ms = do_bench(lambda: torch.matmul(a, b), return_mode="median")
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy_ms = do_bench(lambda: target.copy_(source), return_mode="median")
    return {
        "matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
        "copy_gbps": 2 * copy_bytes / copy_ms / 1e6,
        "matmul": f"bf16 {n}x{n}x{n} torch.matmul on random data",
        "copy": "1 GiB device-to-device copy, bytes read + written",
    }
