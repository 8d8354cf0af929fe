"""Median time of steps: CUDA events on a GPU, wall clock on the CPU.

The op layer times its per-layer choices with it, and the benchmark suite its rows. On CUDA,
each step is timed on its own by `triton.testing.do_bench` (CUDA events, L2 flushed between
runs), after its warm-up, with the steps' device made current: do_bench records its events
there. On the CPU, whose speed drifts over seconds (clock boost, heat, other
processes), the steps take turns, one call each per round, so the drift falls on all of them
alike.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch

# CPU rounds: at least MIN_ROUNDS, then more while the time budget lasts.
MIN_ROUNDS = 5


def compare_ms(
    steps: dict[str, Callable[[int], object]],
    input_sets: int,
    device: torch.device,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> dict[str, float]:
    """Median milliseconds of each step(i), i cycling over range(input_sets). On CUDA, after
    warmup_ms of warm-up and over about rep_ms of repeats each (raise both for steps of tens of
    ms); on the CPU, in rounds for about rep_ms per step, after one warm-up call per input set."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # do_bench's events and L2 flush use the current device
            return {name: _do_bench_ms(step, input_sets, warmup_ms, rep_ms)
                    for name, step in steps.items()}  # fmt: skip
    for step in steps.values():  # warm-up: one-time costs stay out of the numbers
        for i in range(input_sets):
            step(i)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    deadline = time.perf_counter() + rep_ms * len(steps) / 1e3
    round_ = 0
    while round_ < MIN_ROUNDS or time.perf_counter() <= deadline:
        # Alternate the order, so no step always runs right after the same one.
        order = list(steps.items()) if round_ % 2 == 0 else list(steps.items())[::-1]
        for name, step in order:
            start = time.perf_counter()
            step(round_ % input_sets)
            samples[name].append((time.perf_counter() - start) * 1e3)
        round_ += 1
    return {name: statistics.median(times) for name, times in samples.items()}


def _do_bench_ms(step: Callable[[int], object], input_sets: int, warmup_ms, rep_ms) -> float:
    from triton.testing import do_bench

    rotation = itertools.cycle(range(input_sets))

    def call():
        return step(next(rotation))

    return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
