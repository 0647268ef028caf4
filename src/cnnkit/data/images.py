"""The one function every image file goes through: decode with limits, then fit to size and channels.

Training on a folder, `cnnkit predict` and (later) the server all call `decode_image`, so an
image is turned into model input the same way everywhere.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cnnkit.errors import ImageDecodeError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".heic", ".heif"}
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF")
# HEIC, an iPhone's photo format, is read by pillow-heif (`pip install 'cnnkit[heif]'`), an extra: its wheels
# bundle libheif and the x265 encoder (LGPL and GPL), which a library should not impose on every user.
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 40_000_000  # width * height; stops decompression bombs before pixels are decoded
# A JPEG much larger than the size asked for is decoded at 1/2, 1/4 or 1/8 of its size (the JPEG decoder's own
# DCT scaling, Pillow's `draft`) where that leaves at least this many times the size to resample from: Pillow's
# `thumbnail` default, which keeps the result as sharp as resampling the whole image. To 260 px on one thread
# of a Zen 3: 9-megapixel JPEGs (flowers12 scaled up) 5.9 times as fast, 4-megapixel photographs 2.0 times
# (`decode-speed` in benchmarks/RESULTS.md), the pixels within 0.2-0.3 of 255 on average of the whole image's.
REDUCING_GAP = 2.0  # 0: every image decoded whole
CHUNK_BYTES = 256 * 1024  # files a decoding thread takes at a time (decode_images): many tiny ones, or one large
MAX_DECODE_THREADS = 8  # each may hold a whole decoded image (a 40-megapixel PNG: 120 MB), so not one per core of a server


def is_image_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files as given; directories searched (recursively) for image files."""
    from cnnkit.errors import DataError

    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out.extend(sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p)))
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not out:
        raise DataError(f"no image files found in {', '.join(map(str, inputs))}")
    return out


def decode_image(
    source: bytes | str | os.PathLike,
    size: int | None,
    channels: int,
    *,
    name: str | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode an image to a uint8 array of shape (channels, size, size).

    The image is resized so its shorter side is `size` and centre-cropped to a square, which
    keeps the aspect ratio. `size=None` keeps the original size. Transparent pixels are put on
    white. Any failure raises ImageDecodeError naming the file and the reason.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        data = source if isinstance(source, bytes) else _read_bounded(source, max_bytes)
    except OSError as e:
        raise ImageDecodeError(label, f"cannot read file ({e.strerror or e})", "unreadable") from None
    if len(data) > max_bytes:
        raise ImageDecodeError(label, f"file is {len(data)} bytes, more than the limit of {max_bytes}", "too_large")
    if not data:
        raise ImageDecodeError(label, "file is empty", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_formats(data, label))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(label, f"image is {w}x{h} pixels, more than the limit of {max_pixels}", "too_large")
            if size is not None and REDUCING_GAP:
                img.draft(None, (round(size * REDUCING_GAP),) * 2)  # JPEG only; others ignore it
            img.load()  # first frame for GIF
            img = ImageOps.exif_transpose(img)
            img = _to_channels(img, channels)
            if size is not None:
                img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(label, f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(label, f"image has more pixels than the limit of {max_pixels} (a decompression bomb?)",
                               "too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageDecodeError(label, f"cannot decode image ({type(e).__name__}: {e})") from None
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.require(arr, requirements=["C", "W"])  # contiguous and writable (torch wants both)


def is_heif(data: bytes) -> bool:
    """Whether the bytes are a HEIF file (HEIC photos): an ISO media file whose brand is one of HEIF's."""
    return data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS


@functools.cache
def heif_support() -> bool:
    """Whether HEIC/HEIF photos can be read: pillow-heif is installed (then registered with Pillow, once)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _formats(data: bytes, label: str) -> tuple[str, ...]:
    """The formats Pillow may open these bytes as: HEIF too for a HEIF file, which without pillow-heif is
    refused saying how to read it (Pillow alone would call it not an image)."""
    if not is_heif(data):
        return ALLOWED_FORMATS
    if not heif_support():
        raise ImageDecodeError(label, "a HEIC/HEIF photo (an iPhone's format), which needs pillow-heif: pip install "
                                      "'cnnkit[heif]', or export the photos as JPEG")
    return (*ALLOWED_FORMATS, "HEIF")


def decode_images(sources: Sequence[bytes | str | os.PathLike], size: int | None, channels: int, *,
                  names: Sequence[str] | None = None, workers: int | None = None,
                  **limits: int) -> Iterator[np.ndarray | ImageDecodeError]:
    """`decode_image` of each source, in order, on `workers` threads (default: one per usable core, at
    most MAX_DECODE_THREADS): the decoded array, or the ImageDecodeError that says why that file could
    not be. Pillow lets go of Python's lock while it decodes and resamples, so threads decode large images side by side
    (flowers12's 960 JPEGs: 2.5 s on two threads against 3.2 on one, a 2-core Zen 3). Each thread takes
    a run of files of about CHUNK_BYTES at a time: handing tiny files over one by one cost more than
    decoding them (12,000 of CIFAR-10's 32-px PNGs: 2.75 s on two threads against 2.16 on one; in runs
    of 16, 1.95). At most twice `workers` runs are read ahead, so a large folder is never all in memory
    at once as files."""
    def run(files: range) -> list[np.ndarray | ImageDecodeError]:
        out: list[np.ndarray | ImageDecodeError] = []
        for i in files:
            try:
                out.append(decode_image(sources[i], size, channels, name=names[i] if names else None, **limits))
            except ImageDecodeError as e:
                out.append(e)
        return out

    runs = _runs(sources)
    workers = workers or min(usable_cores(), MAX_DECODE_THREADS)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(run, files) for files in runs[: 2 * workers])
        for n in range(len(runs)):
            if n + 2 * workers < len(runs):
                pending.append(pool.submit(run, runs[n + 2 * workers]))
            yield from pending.popleft().result()


def _runs(sources: Sequence[bytes | str | os.PathLike]) -> list[range]:
    """The sources cut into runs of consecutive ones of about CHUNK_BYTES (at least one file each)."""
    runs, start, held = [], 0, 0
    for i, source in enumerate(sources):
        held += len(source) if isinstance(source, bytes) else _file_bytes(source)
        if held >= CHUNK_BYTES:
            runs.append(range(start, i + 1))
            start, held = i + 1, 0
    if start < len(sources):
        runs.append(range(start, len(sources)))
    return runs


def _file_bytes(path: str | os.PathLike) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # decode_image says what is wrong with it


def usable_cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the value range to 8 bits instead of clipping it.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode == "P" or img.mode == "LA" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L" if channels == 1 else "RGB")
