import gzip
import struct

import numpy as np
import pytest
import torch

from experiments.data.fashion_mnist import DEFAULT_ROOT, FILES, load_fashion_mnist, read_idx


def _write_idx(path, arr: np.ndarray, code=0x08, gz=True):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    data = {
        "train_images": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 12, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    for k, arr in data.items():
        _write_idx(tmp_path / FILES[k], arr)
    return tmp_path, data


def test_loader_reads_fixture_exactly(fmnist_dir):
    root, data = fmnist_dir
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(root)
    assert x_tr.shape == (12, 28, 28) and x_tr.dtype == torch.float32
    assert y_te.shape == (5,) and y_te.dtype == torch.int64
    np.testing.assert_allclose(x_tr.numpy(), data["train_images"] / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y_tr.numpy(), data["train_labels"])
    np.testing.assert_array_equal(y_te.numpy(), data["test_labels"])
    x_tr, y_tr, x_te, _ = load_fashion_mnist(root, train_limit=4, test_limit=2)
    assert len(x_tr) == 4 and len(x_te) == 2
    np.testing.assert_array_equal(y_tr.numpy(), data["train_labels"][:4])


def test_read_idx_other_dtypes_and_plain_files(tmp_path):
    arr = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    _write_idx(tmp_path / "a.idx", arr, code=0x0C, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)


def test_bad_files_give_clear_errors(tmp_path, fmnist_dir):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01abcd"))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad.gz")
    short = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc"
    (tmp_path / "short.gz").write_bytes(gzip.compress(short))
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    root, _ = fmnist_dir
    with pytest.raises(ValueError, match="train_limit"):
        load_fashion_mnist(root, train_limit=0)


def test_mismatched_labels_rejected(tmp_path, fmnist_dir):
    root, data = fmnist_dir
    _write_idx(root / FILES["train_labels"], data["train_labels"][:7])
    with pytest.raises(ValueError, match="do not match"):
        load_fashion_mnist(root)


@pytest.mark.skipif(not (DEFAULT_ROOT / FILES["test_labels"]).is_file(),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_labels_are_balanced():
    y_te = torch.from_numpy(read_idx(DEFAULT_ROOT / FILES["test_labels"]).astype("int64"))
    assert torch.bincount(y_te, minlength=10).tolist() == [1000] * 10
