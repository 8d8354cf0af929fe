"""Where the benchmark suites run: the real UNet shapes on CUDA, small torch paths on the CPU."""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="GPU case: needs a CUDA device")
