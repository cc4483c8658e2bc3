"""scikit-learn's bundled digits (1797 real 8x8 handwritten digits): no download needed."""

from __future__ import annotations

import numpy as np
import torch


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """Stratified train/test split of sklearn's digits.

    Returns (x_train, y_train, x_test, y_test): images as float32 (N, 8, 8) scaled to [0, 1], labels int64 (N,).
    The split depends only on ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the demo extra
        raise ImportError("the digits data needs scikit-learn: pip install 'strassenkit[demo]'") from e
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test_idx.extend(idx[:k])
        train_idx.extend(idx[k:])
    train_idx, test_idx = rng.permutation(train_idx), rng.permutation(test_idx)
    t = torch.from_numpy
    return t(x[train_idx]), t(y[train_idx]), t(x[test_idx]), t(y[test_idx])
