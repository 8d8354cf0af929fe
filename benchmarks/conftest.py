"""pytest-benchmark suites of `fastunet bench`'s cases, for pytest-benchmark's storage and
comparison (`pytest benchmarks --benchmark-enable --benchmark-autosave`, then
`pytest-benchmark compare`). The project's pytest runs them once each with benchmarking off.

On CUDA they time the real UNet shapes; on the CPU the torch paths at small sizes.
"""

import pytest
import torch
from bench_device import ON_GPU


@pytest.fixture
def timed(benchmark):
    """benchmark(fn, i) with inputs rotating over `sets`, synchronised on CUDA."""

    def run(step, sets: int):
        counter = iter(range(10**9))

        def call():
            out = step(next(counter) % sets)
            if ON_GPU:
                torch.cuda.synchronize()
            return out

        return benchmark(call)

    return run


@pytest.fixture(autouse=True)
def _cpu_uses_torch_paths(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("FASTUNET_BACKEND", "torch")
