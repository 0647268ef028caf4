import gzip
import hashlib

import numpy as np
import pytest

from cnnkit.data import fashion_mnist
from cnnkit.errors import DataError


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fake_fmnist(directory, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        (directory / name).write_bytes(gzip.compress(raw))
        files[name] = (hashlib.md5((directory / name).read_bytes()).hexdigest(), hashlib.md5(raw).hexdigest())
    return arrays, files


def test_parse_idx_roundtrip():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = fashion_mnist.parse_idx(idx_bytes(arr))
    assert out.shape == (2, 3, 4) and (out == arr).all()
    out[0, 0, 0] = 7  # must be writable for torch


@pytest.mark.parametrize("data,message", [
    (b"\x01\x02\x08\x01", "magic"),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0", "unsigned-byte"),
    (bytes([0, 0, 8, 3, 0, 0]), "truncated header"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "holds 2 bytes"),
])
def test_parse_idx_rejects_bad_files(data, message):
    with pytest.raises(DataError, match=message):
        fashion_mnist.parse_idx(data, "x.idx")


def test_load_from_data_dir(tmp_path, monkeypatch):
    arrays, files = write_fake_fmnist(tmp_path / "fm")
    monkeypatch.setattr(fashion_mnist, "FILES", files)
    ds = fashion_mnist.load(tmp_path / "fm", allow_download=False)
    assert ds.splits["train"].images.shape == (20, 1, 28, 28)
    assert (ds.splits["test"].images[:, 0] == arrays["t10k-images-idx3-ubyte.gz"]).all()
    assert ds.source == str(tmp_path / "fm")


def test_content_checksum_mismatch_is_an_error(tmp_path):
    write_fake_fmnist(tmp_path / "fm")  # not the official files
    with pytest.raises(DataError, match="does not match the official"):
        fashion_mnist.load(tmp_path / "fm", allow_download=False)


def test_missing_offline_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        fashion_mnist.load(tmp_path / "empty", allow_download=False)
    text = str(e.value)
    assert "--data-dir" in text and "CNNKIT_HOME" in text and "apt-get install dataset-fashion-mnist" in text


def test_download_checks_md5_and_is_atomic(tmp_path, monkeypatch, isolated_home):
    """The real download path, against file:// URLs of small files the test writes."""
    _, files = write_fake_fmnist(tmp_path / "server")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(fashion_mnist, "URL", (tmp_path / "server").as_uri() + "/")
    monkeypatch.setattr(fashion_mnist, "FILES", files)
    ds = fashion_mnist.load(None)
    assert len(ds.splits["train"]) == 20
    assert (isolated_home / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()

    # A wrong checksum: the file is rejected and nothing is left in place.
    bad = dict(files)
    bad["t10k-labels-idx1-ubyte.gz"] = ("0" * 32, files["t10k-labels-idx1-ubyte.gz"][1])
    monkeypatch.setattr(fashion_mnist, "FILES", bad)
    target = tmp_path / "home2"
    monkeypatch.setenv("CNNKIT_HOME", str(target))
    with pytest.raises(DataError, match="checksum mismatch"):
        fashion_mnist.load(None)
    assert not (target / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not any(p.name.endswith(".tmp") for p in (target / "fashion-mnist").iterdir())


def test_truncated_gzip_is_reported(tmp_path, monkeypatch):
    _, files = write_fake_fmnist(tmp_path / "fm")
    monkeypatch.setattr(fashion_mnist, "FILES", files)
    p = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a readable gzip"):
        fashion_mnist.load(tmp_path / "fm", allow_download=False)


def test_real_fashion_mnist_loads():
    if not fashion_mnist.SYSTEM_DIR.exists():
        pytest.skip("dataset-fashion-mnist not installed")
    ds = fashion_mnist.load(None, allow_download=False)
    assert ds.splits["train"].images.shape == (60000, 1, 28, 28)
    assert ds.splits["test"].images.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.splits["train"].labels).tolist() == [6000] * 10
