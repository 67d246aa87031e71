"""segscale: train CNN segmentation models for medical images on one or many workers."""

from segscale.errors import SegscaleError

__version__ = "0.1.0"
__all__ = ["SegscaleError", "__version__"]
