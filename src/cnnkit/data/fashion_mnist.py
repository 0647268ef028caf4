"""Fashion-MNIST from the official IDX .gz files."""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from pathlib import Path

import numpy as np

from cnnkit.data.dataset import Dataset, Split
from cnnkit.data.download import cnnkit_home, download
from cnnkit.errors import DataError

log = logging.getLogger(__name__)

NAME = "fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
# name -> (md5 of the upstream .gz, md5 of the decompressed bytes). Debian recompresses the
# .gz files, so local files are checked by their decompressed content.
FILES = {
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}


def parse_idx(data: bytes, what: str = "IDX file") -> np.ndarray:
    """Parse an uncompressed IDX file (uint8 data) into an array of its declared shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{what}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{what}: only unsigned-byte IDX data is supported, found type code 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{what}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise DataError(f"{what}: header declares shape {shape} ({expected} bytes) but holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def find(data_dir: Path | None) -> Path | None:
    """The first directory holding all four files: --data-dir, CNNKIT_HOME, the Debian package."""
    candidates = [data_dir, data_dir / NAME if data_dir else None, cnnkit_home() / NAME, SYSTEM_DIR]
    for d in candidates:
        if d is not None and all((d / f).is_file() for f in FILES):
            return d
    return None


def holds(data_dir: Path) -> bool:
    """Whether `data_dir` itself (or its fashion-mnist/ folder) holds the four files, not the places
    `find` falls back to."""
    return any(all((d / f).is_file() for f in FILES) for d in (data_dir, data_dir / NAME))


def load(data_dir: Path | None = None, allow_download: bool = True, verify: bool = True) -> Dataset:
    directory = find(data_dir)
    if directory is None:
        if not allow_download:
            raise DataError(_missing_message(data_dir))
        directory = fetch(cnnkit_home() / NAME, data_dir)
    arrays = {name: _read_gz(directory / name, verify) for name in FILES}
    train_x, train_y = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
    test_x, test_y = arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{directory}: {prefix}-images holds {x.shape} but {prefix}-labels holds {y.shape}; expected "
                "N images of HxW and N labels. One of the two files is wrong: provide the official pair.")
        if y.max(initial=0) >= len(CLASSES):
            raise DataError(f"{directory / (prefix + '-labels-idx1-ubyte.gz')}: labels must lie in 0..9, found {y.max()}")
    splits = {"train": Split(train_x[:, None], train_y), "test": Split(test_x[:, None], test_y)}
    return Dataset(NAME, CLASSES, splits, source=str(directory))


def fetch(dest: Path, data_dir: Path | None = None) -> Path:
    """Download the four official files into dest, checking each md5."""
    for name, (gz_md5, _) in FILES.items():
        if not (dest / name).is_file():
            try:
                download(URL + name, dest / name, gz_md5)
            except DataError as e:
                raise DataError(f"{e}\n{_missing_message(data_dir)}") from None
    return dest


def _missing_message(data_dir: Path | None) -> str:
    looked = f" (looked in {data_dir})" if data_dir else ""
    return (
        f"Fashion-MNIST not found{looked} and it could not be downloaded. Provide it in one of three ways:\n"
        f"  1. --data-dir DIR, a directory holding the four official files ({', '.join(FILES)});\n"
        f"  2. put those files in {cnnkit_home() / NAME} (set CNNKIT_HOME to move it);\n"
        f"  3. on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (installs {SYSTEM_DIR})."
    )


def _read_gz(path: Path, verify: bool) -> np.ndarray:
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e}); delete it and provide it again") from None
    if verify:
        expected = FILES[path.name][1]
        if hashlib.md5(data).hexdigest() != expected:
            raise DataError(
                f"{path}: content does not match the official Fashion-MNIST file (md5 of the decompressed "
                f"data should be {expected}); delete it and provide the official file"
            )
    return parse_idx(data, str(path))
