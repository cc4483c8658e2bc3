"""Fashion-MNIST from gzipped IDX files (60000 train + 10000 test real 28x28 images, 10 classes).

Nothing is downloaded. Default location: ``/usr/share/datasets/fashion-mnist/`` from the Debian package
``dataset-fashion-mnist`` (``sudo apt-get install dataset-fashion-mnist``, or ``make data``). Any folder
holding the four canonical files works (``root=`` or the ``STRASSENKIT_FASHION_MNIST`` environment variable).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEFAULT_ROOT", "FILES", "CLASSES", "read_idx", "load_fashion_mnist", "find_fashion_mnist"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_INSTALL_HINT = (
    "install the Debian package with `sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` "
    "(or `make data`), or pass root=/path/to/folder holding " + ", ".join(FILES.values())
)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends with .gz) into a numpy array of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload has {len(data) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the four files; raise FileNotFoundError with the install command if absent."""
    if root is None:
        root = os.environ.get("STRASSENKIT_FASHION_MNIST", DEFAULT_ROOT)
    root = Path(root)
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): {_INSTALL_HINT}")
    return root


def load_fashion_mnist(root: str | os.PathLike | None = None, train_limit: int | None = None,
                       test_limit: int | None = None):
    """Load Fashion-MNIST.

    Returns (x_train, y_train, x_test, y_test): images float32 (N, 28, 28) scaled to [0, 1], labels int64 (N,).
    ``train_limit``/``test_limit`` keep the first N images of each split (the files are class-balanced and shuffled).
    """
    root = find_fashion_mnist(root)
    arrays = {k: read_idx(root / v) for k, v in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{root}: {split} images {x.shape} and labels {y.shape} do not match")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{root}: {split} labels outside 0..9")
    for name, lim in (("train_limit", train_limit), ("test_limit", test_limit)):
        if lim is not None and (not isinstance(lim, int) or lim < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {lim!r}")

    def conv(x, y, lim):
        x, y = x[:lim], y[:lim]
        return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = conv(arrays["train_images"], arrays["train_labels"], train_limit)
    x_te, y_te = conv(arrays["test_images"], arrays["test_labels"], test_limit)
    return x_tr, y_tr, x_te, y_te
