"""Each op at each UNet level, fastunet against eager PyTorch, forward and forward+backward."""

import pytest
from bench_device import DEVICE, GPU_ONLY, ON_GPU

from fastunet.bench import suite

_, BENCHES = suite.op_benches(quick=not ON_GPU, device=DEVICE)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("candidate", ["fastunet", "eager"])
@pytest.mark.parametrize("name,bench", BENCHES, ids=[f"{b.op}-{n}" for n, b in BENCHES])
def test_op(timed, name, bench, candidate, backward):
    sets = suite.op_input_sets(bench)
    fn = bench.fastunet if candidate == "fastunet" else bench.eager
    timed(suite.op_step(bench, fn, sets, backward), len(sets))


@GPU_ONLY
def test_gpu_cases_are_the_unet_shapes():
    assert any(bench.shape.height == 256 and bench.shape.batch == 16 for _, bench in BENCHES)
