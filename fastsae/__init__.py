"""fastsae: sparse autoencoders for mechanistic interpretability, with fused Triton kernels."""
from fastsae._version import __version__

__all__ = ["__version__"]
