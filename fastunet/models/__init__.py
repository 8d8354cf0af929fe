from fastunet.models.reference import ReferenceUNet
from fastunet.models.unet import UNet

__all__ = ["ReferenceUNet", "UNet"]
