"""fastunet: a drop-in PyTorch UNet whose hot paths run on fused Triton and CUDA kernels."""

from fastunet import nn, ops
from fastunet._accelerate import AccelerationReport, accelerate, acceleration_report
from fastunet._version import __version__
from fastunet.info import info
from fastunet.models import ReferenceUNet, UNet

__all__ = [
    "AccelerationReport",
    "ReferenceUNet",
    "UNet",
    "__version__",
    "accelerate",
    "acceleration_report",
    "info",
    "nn",
    "ops",
]
