"""lbridge: feature caching with learned calibration for Diffusion Transformers."""

from lbridge.api import Accelerator, accelerate

__version__ = "0.1.0"
__all__ = ["Accelerator", "accelerate"]
