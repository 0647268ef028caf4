import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cnnkit.data import cifar10, load_dataset
from cnnkit.errors import DataError


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_pickle_archive(path, per_batch=6, payload=None):
    """A small archive in the official format: cifar-10-batches-py/data_batch_1..5, test_batch."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, per_batch)]  # plain ints, as in the official files
            batches[name] = (data, labels)
            obj = payload if payload is not None else {b"batch_label": name.encode(), b"labels": labels, b"data": data}
            add_member(tar, f"cifar-10-batches-py/{name}", pickle.dumps(obj, protocol=2))
    return batches, hashlib.md5(path.read_bytes()).hexdigest()


def test_pickle_archive_is_parsed_in_official_layout(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    batches, md5 = write_pickle_archive(path)
    ds = cifar10.load_pickle_archive(path, md5=md5)
    train = ds.splits["train"]
    assert train.images.shape == (30, 3, 32, 32) and ds.splits["test"].images.shape == (6, 3, 32, 32)
    # Rows are 1024 red, then 1024 green, then 1024 blue values, row-major.
    first = batches["data_batch_1"][0][0]
    assert (train.images[0, 1].ravel() == first[1024:2048]).all()
    assert train.labels[:6].tolist() == batches["data_batch_1"][1]
    assert ds.classes == cifar10.CLASSES


def test_checksum_is_checked_before_any_pickle_is_opened(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "cifar-10-python.tar.gz"
    _, md5 = write_pickle_archive(path, payload=Evil())
    with pytest.raises(DataError, match="checksum mismatch"):
        cifar10.load_pickle_archive(path)  # the official md5: this file does not match
    assert not (tmp_path / "pwned").exists()
    # Even with a matching checksum, only numpy arrays and plain data may be unpickled.
    with pytest.raises(DataError, match="refusing to load"):
        cifar10.load_pickle_archive(path, md5=md5)
    assert not (tmp_path / "pwned").exists()


def write_png_tree(root, classes, per_class=3, size=32):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_image_folder_tree_and_archive(tmp_path):
    write_png_tree(tmp_path / "tree", cifar10.CLASSES)
    ds = load_dataset("cifar10", tmp_path / "tree", allow_download=False)
    assert ds.splits["train"].images.shape == (30, 3, 32, 32)
    assert ds.classes == cifar10.CLASSES
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="cifar10")
    ds2 = load_dataset("cifar10", tmp_path / "c.tar.gz", allow_download=False)
    assert (ds2.splits["test"].images == ds.splits["test"].images).all()


def test_other_classes_are_not_cifar10(tmp_path):
    write_png_tree(tmp_path / "tree", ["cats", "dogs"])
    with pytest.raises(DataError, match="--dataset folder"):
        load_dataset("cifar10", tmp_path / "tree", allow_download=False)


def test_missing_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--data-dir PATH"):
        cifar10.load(None, allow_download=False)


@pytest.mark.slow
def test_shared_png_archive_loads_and_caches(monkeypatch):
    from conftest import SHARED_CIFAR

    if not SHARED_CIFAR.exists():
        pytest.skip("shared/datasets/cifar10-png.tar.gz not present")
    ds = load_dataset("cifar10", SHARED_CIFAR, allow_download=False)
    assert ds.splits["train"].images.shape == (50000, 3, 32, 32)
    assert ds.splits["test"].images.shape == (10000, 3, 32, 32)
    mean = ds.splits["train"].images.mean(axis=(0, 2, 3)) / 255
    assert np.allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-3)
    from cnnkit.data import folder

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(folder, "_decode_tree", no_decoding)
    again = load_dataset("cifar10", SHARED_CIFAR, allow_download=False)
    assert (again.splits["test"].labels == ds.splits["test"].labels).all()
