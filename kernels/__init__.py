"""Triton kernels and their launchers (installed as `fastunet.kernels`): one file per fused op.

No autograd and no nn here: the op layer (`fastunet.ops`) validates input and calls these.
Importing this package does not import triton; importing one of its modules does.
"""

import os

import torch


def interprets(value: str | None) -> bool:
    """Whether Triton reads this TRITON_INTERPRET value as on (its rule, here without
    importing triton)."""
    return (value or "").lower() in ("1", "true", "on", "yes", "y")


# Triton decides at kernel definition whether to interpret.
INTERPRET = interprets(os.environ.get("TRITON_INTERPRET"))
# Read once: torch.compile cannot trace the call, and a build does not gain cuDNN.
CUDNN_BUILT = torch.backends.cudnn.is_available()


class IndexRangeError(ValueError):
    """A tensor too large for a kernel's int32 indices. Raised before any launch; where the op
    layer chooses a layer's path by measuring (FASTUNET_BACKEND unset), it runs PyTorch's."""


def cudnn_convolves() -> bool:
    """Whether PyTorch's CUDA convolutions run on cuDNN now (else on its own kernels, whose
    matrix products are cuBLAS's): built with it, and not turned off."""
    return CUDNN_BUILT and torch.backends.cudnn.enabled


# Host-side grid arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr functions,
# whose every call from Python costs 2-3 us (Triton 3.6 and 3.9, 2-core x86 CPU, 2026-12-07):
# a conv layer's training step made about 13 of them.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()
