"""fastunet: a drop-in PyTorch UNet whose hot paths run on fused Triton and CUDA kernels."""

from fastunet import nn, ops
from fastunet._version import __version__
from fastunet.info import info
from fastunet.models import ReferenceUNet, UNet

__all__ = ["ReferenceUNet", "UNet", "__version__", "info", "nn", "ops"]
