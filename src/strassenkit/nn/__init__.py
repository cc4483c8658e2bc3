"""nn.Module layers built on :mod:`strassenkit.functional`."""

from .stlinear import STLinear

__all__ = ["STLinear"]
