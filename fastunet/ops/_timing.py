"""Median time of a step: CUDA events on a GPU, wall clock on the CPU.

The op layer times its per-layer choices with it, and the benchmark suite its rows. On CUDA,
times are medians of CUDA-event timings from `triton.testing.do_bench` (which also flushes L2
between runs), after its warm-up. On the CPU, a few wall-clock repeats.
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
