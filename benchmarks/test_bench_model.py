"""The whole UNet: fastunet against the reference module's baselines, inference and training."""

import pytest
import torch
from bench_device import DEVICE, ON_GPU

from fastunet.bench import suite

CASES = suite.model_cases(quick=not ON_GPU)
CANDIDATES = ["fastunet", "eager_fp32_nchw", "eager_bf16_cl", "compile"]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_model(timed, case, candidate, training):
    reference, fast = suite.case_models(case, DEVICE)
    candidates = suite.model_candidates(case, reference, fast, DEVICE, quick=not ON_GPU)
    if candidate not in candidates:
        pytest.skip(f"{candidate} is not timed for {case.name} (see `fastunet bench`)")
    module, layout, autocast, benchmark = candidates[candidate]
    torch.backends.cudnn.benchmark = benchmark
    module.train(training)
    step = suite.model_step(module, training, autocast, DEVICE)
    sets = [
        (
            torch.randn(case.batch, 3, case.size, case.size, device=DEVICE).contiguous(
                memory_format=layout
            ),
            torch.randint(0, 2, (case.batch, case.size, case.size), device=DEVICE),
        )
        for _ in range(suite.INPUT_SETS)
    ]
    timed(lambda i: step(*sets[i]), len(sets))
