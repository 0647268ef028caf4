from __future__ import annotations

import gzip
import logging
import os
import time
from pathlib import Path

import numpy as np  # neither imports torch
import pytest

# Under pytest-xdist (`pytest -n 2`), each worker's torch gets its share of the cores (set before any
# test module imports torch; the `cnnkit` processes that tests start inherit it): two workers with two
# threads each on a 2-core machine would slow each other far more than twice.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-png.tar.gz"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CNNKIT_HOME, so caches and downloads never leak between tests."""
    home = tmp_path_factory.mktemp("cnnkit-home")
    monkeypatch.setenv("CNNKIT_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def fresh_logging():
    """The "cnnkit" logger as a new process has it after every test: a test that ran the CLI leaves it a
    handler on that test's captured stderr, closed once the test ends ("Logging error: I/O operation on
    closed file" in every later test's output)."""
    yield
    logger = logging.getLogger("cnnkit")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.fixture
def time_slack() -> float:
    """How far a run may overrun its time budget in a test: in one process not at all; under `pytest -n 2`
    the other worker shares the CPU and may start heavier work after the run has planned its time (seen:
    31.7 s where the plan said at most 30), which no plan can foresee. A run that ignored its budget
    still fails."""
    return 1.25 if WORKERS > 1 else 1.0


@pytest.fixture(scope="session")
def fmnist_images() -> tuple[np.ndarray, np.ndarray]:
    """The first 500 real Fashion-MNIST test images (28x28 uint8) and labels."""
    if not FMNIST_DIR.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from cnnkit.data.fashion_mnist import parse_idx

    x = parse_idx(gzip.decompress((FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()))[:500]
    y = parse_idx(gzip.decompress((FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))[:500]
    return x, y.astype(np.int64)


@pytest.fixture
def photos(tmp_path, fmnist_images):
    """A small folder of real pictures as JPEGs: 3 garments, 16 training and 6 test images each, 40 px."""
    from PIL import Image

    x, y = fmnist_images
    root = tmp_path / "photos"
    for split, start, count in (("train", 0, 16), ("test", 16, 6)):
        for name, label in {"bag": 8, "sandal": 5, "trouser": 1}.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in np.flatnonzero(y == label)[start:start + count]:
                Image.fromarray(x[i]).resize((40, 40)).convert("RGB").save(d / f"{i}.jpg", quality=92)
    return root


@pytest.fixture
def smooth_pictures():
    """make(n, size=96, seed=0): (n, 3, size, size) uint8 pictures of blurred noise, each unlike the
    others, with a photo's smoothness."""
    from PIL import Image, ImageFilter

    def make(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            noise = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)).resize((size, size))
            out.append(np.asarray(noise.filter(ImageFilter.GaussianBlur(2))).transpose(2, 0, 1))
        return np.stack(out)
    return make


@pytest.fixture
def slow_features(monkeypatch):
    """A slower CPU's linear-probe features: `slow_features(seconds)` makes every cnnkit.probe.probe_rows call
    take `seconds` more for each image (not the few images a candidate is timed on first, which go another way)
    and returns the list of the images' counts, call by call."""
    from cnnkit import probe

    real_rows, seen = probe.probe_rows, []

    def slowed(seconds: float) -> list[int]:
        def slow_rows(model, preprocess, images, *args, **kwargs):
            time.sleep(seconds * len(images))
            seen.append(len(images))
            return real_rows(model, preprocess, images, *args, **kwargs)

        monkeypatch.setattr(probe, "probe_rows", slow_rows)
        return seen

    return slowed
