"""Triton kernels and their launchers (installed as `fastunet.kernels`): one file per fused op.

No autograd and no nn here: the op layer (`fastunet.ops`) validates input and calls these.
Importing this package does not import triton; importing one of its modules does.
"""

import os

import torch

# Triton decides at kernel definition whether to interpret; this is its rule for the variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")
# Read once: torch.compile cannot trace the call, and a build does not gain cuDNN.
CUDNN_BUILT = torch.backends.cudnn.is_available()


def cudnn_convolves() -> bool:
    """Whether PyTorch's CUDA convolutions run on cuDNN now (else on its own kernels, whose
    matrix products are cuBLAS's): built with it, and not turned off."""
    return CUDNN_BUILT and torch.backends.cudnn.enabled
