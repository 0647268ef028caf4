"""CIFAR-10: the official pickled archive (checksum first), or an image-folder tree or archive of it."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from cnnkit.data import folder
from cnnkit.data.cache import cache_key, cached_arrays
from cnnkit.data.dataset import Dataset, Split
from cnnkit.data.download import cnnkit_home, download, verify_md5
from cnnkit.errors import DataError

log = logging.getLogger(__name__)

NAME = "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"


def find(data_dir: Path | None) -> Path | None:
    """The official archive, or an image-folder tree/archive, under --data-dir or CNNKIT_HOME."""
    for d in [data_dir, cnnkit_home() / NAME]:
        if d is None or not d.exists():
            continue
        if d.is_file():
            return d
        if (d / ARCHIVE).is_file():
            return d / ARCHIVE
        if any((d / s).is_dir() for s in ("train", "test")):
            return d
        archives = sorted(p for p in d.iterdir() if folder.is_archive(p))
        if len(archives) == 1:
            return archives[0]
    return None


def load(data_dir: Path | None = None, allow_download: bool = True, skip_bad: bool = False) -> Dataset:
    source = find(data_dir)
    if source is None:
        if data_dir is not None and not data_dir.exists():
            raise DataError(f"--data-dir {data_dir}: no such file or directory")
        if not allow_download:
            raise DataError(_missing_message(data_dir))
        try:
            source = download(URL, cnnkit_home() / NAME / ARCHIVE, MD5)
        except DataError as e:
            raise DataError(f"{e}\n{_missing_message(data_dir)}") from None
    if source.is_file() and _is_pickle_archive(source):
        return load_pickle_archive(source)
    ds = folder.load(source, size=32, channels=3, name=NAME, skip_bad=skip_bad)
    if ds.classes != CLASSES:
        raise DataError(
            f"{source}: class folders {ds.classes} are not CIFAR-10's {CLASSES}; "
            "for another image collection use --dataset folder"
        )
    return ds


def load_pickle_archive(path: Path, md5: str = MD5) -> Dataset:
    """Read the official python-pickle archive, but only after its md5 matches `md5`."""
    verify_md5(path, md5, what=str(path))

    def build():
        batches = _read_batches(path, TRAIN_BATCHES + [TEST_BATCH])
        arrays = {
            "train_images": np.concatenate([batches[n][0] for n in TRAIN_BATCHES]),
            "train_labels": np.concatenate([batches[n][1] for n in TRAIN_BATCHES]),
            "test_images": batches[TEST_BATCH][0],
            "test_labels": batches[TEST_BATCH][1],
        }
        return arrays, {"classes": "\n".join(CLASSES)}

    arrays, _ = cached_arrays(NAME, cache_key(md5=md5, v=1), build)
    splits = {s: Split(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in ("train", "test")}
    return Dataset(NAME, CLASSES, splits, source=str(path))


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Defence in depth: even a checksummed pickle may only build numpy arrays and plain data."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _read_batches(archive: Path, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if name in names and member.isfile():
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
                    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    labels = np.asarray(batch[b"labels"], dtype=np.int64)
                    if len(data) != len(labels):
                        raise DataError(f"{archive}: {name} has {len(data)} images but {len(labels)} labels")
                    out[name] = (data, labels)
    except (tarfile.TarError, EOFError, OSError, zlib.error, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise DataError(f"{archive}: cannot read the CIFAR-10 batches ({e}); provide the official {ARCHIVE} again") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise DataError(f"{archive}: {', '.join(missing)} not inside; is this the official {ARCHIVE}?")
    return out


def official_archive(data_dir: Path) -> Path | None:
    """The official pickled archive if `data_dir` is it or holds it by its name, else None."""
    if data_dir.is_file():
        return data_dir if _is_pickle_archive(data_dir) else None
    return data_dir / ARCHIVE if (data_dir / ARCHIVE).is_file() else None


def _is_pickle_archive(path: Path) -> bool:
    if path.name == ARCHIVE:
        return True
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                return Path(m.name).parts[0] == "cifar-10-batches-py"
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return False
    return False


def _missing_message(data_dir: Path | None) -> str:
    looked = f" (looked in {data_dir})" if data_dir else ""
    return (
        f"CIFAR-10 not found{looked} and it could not be downloaded. Provide it in one of these ways:\n"
        f"  1. --data-dir PATH: the official {ARCHIVE}, or a folder tree train/<class>/*.png and test/<class>/*.png,\n"
        f"     or a .tar.gz of such a tree (for example cifar10-png.tar.gz);\n"
        f"  2. put one of those in {cnnkit_home() / NAME} (set CNNKIT_HOME to move it);\n"
        f"  3. connect to the internet: cnnkit downloads {URL} and checks its md5."
    )
