"""lowbit: low-bit diffusion models."""
__version__ = "0.1.0"
