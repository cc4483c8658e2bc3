"""Small helpers shared by every layer of the package (imports nothing from strassenkit).

Written once here: ceiling division, zero padding of the last two dims, integer argument checks and
the on-disk cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ceil_div", "check_int", "cache_dir", "pad_last2"]


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers (b > 0)."""
    return -(-a // b)


def check_int(name: str, value, lo: int = 1, allow_none: bool = False):
    """Return ``value`` if it is an int >= ``lo`` (or None when allowed); else ValueError naming ``name``.

    Bools are refused (``True`` is not a size); numpy integers are accepted.
    """
    if value is None and allow_none:
        return value
    import numpy as np

    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{' or None' if allow_none else ''}, got {value!r}")
    return value


def cache_dir() -> Path:
    """Directory of the on-disk cache: ``$STRASSENKIT_CACHE`` or ``~/.cache/strassenkit``."""
    root = os.environ.get("STRASSENKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "strassenkit"


def pad_last2(x, rows: int, cols: int):
    """Zero-pad the last two dims of tensor ``x`` up to (rows, cols) (no copy when already that size)."""
    pr, pc = rows - x.shape[-2], cols - x.shape[-1]
    if pr or pc:
        import torch.nn.functional as F

        x = F.pad(x, (0, pc, 0, pr))
    return x
