"""Decoding a folder of photos, as a first run does (`cnnkit train --dataset folder`, nothing cached).

Phone and camera photos are 8-12 megapixels; the photo default decodes them to 260 px. Three ways,
each timed over the whole folder through `cnnkit.data.folder.load` with an empty cache folder:

- as cnnkit decodes: a JPEG at 1/2, 1/4 or 1/8 of its size where that leaves at least twice the size
  asked for (`cnnkit.data.images.REDUCING_GAP`), on one thread per core (`decode_images`);
- the same on one thread;
- every image decoded whole, on one thread (cnnkit before the two changes above).

It also says how far the first's pixels are from the last's (mean and largest absolute difference
of 0-255 values). Folders of large photos to try: `flowers12` scaled up (`--make-large`, below) or
any folder of class folders of your own.

    python benchmarks/decode_speed.py /tmp/data/flowers12 /tmp/data/flowers12-large
    python benchmarks/decode_speed.py --make-large /tmp/data/flowers12 /tmp/data/flowers12-large --side 3024
    python benchmarks/decode_speed.py --size 32 cifar10-png.tar.gz --label decode-speed-cifar10

Writes the block `decode-speed` of benchmarks/RESULTS.md (or --label).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from cnnkit.data import folder, images
from run_recipes import measured_header, write_block


@contextmanager
def decoding(gap: float, workers: int | None) -> Iterator[None]:
    """cnnkit's decoding with another reducing gap (0: whole images) and number of threads."""
    saved_gap, saved_cores = images.REDUCING_GAP, images.usable_cores
    images.REDUCING_GAP = gap
    if workers:
        images.usable_cores = lambda: workers
    try:
        yield
    finally:
        images.REDUCING_GAP, images.usable_cores = saved_gap, saved_cores


def timed_load(root: Path, size: int) -> tuple[float, np.ndarray]:
    """Seconds to load the folder with nothing cached, and its images (every split's, one after another)."""
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ds = folder.load(root, size, 3, cache_dir=Path(cache))
        return time.perf_counter() - t0, np.concatenate([split.images for split in ds.splits.values()])


def megapixels(root: Path) -> str:
    """The folder's mean image size in megapixels (of up to 20 files); an archive's are not opened."""
    if root.is_file():
        return "-"
    files = sorted(p for p in root.rglob("*") if images.is_image_file(p))[:20]
    return f"{np.mean([np.prod(Image.open(f).size) / 1e6 for f in files]):.2f}"


def make_large(source: Path, out: Path, side: int) -> None:
    """Every JPEG of `source` scaled up to side x side (bicubic), saved at quality 90 under `out`."""
    for f in sorted(source.rglob("*.jpg")):
        target = out / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(target, quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path,
                   help="folders of class folders (or train/ and test/), or archives of one")
    p.add_argument("--size", type=int, default=260, help="the size decoded to (the photos recipe's 260)")
    p.add_argument("--make-large", action="store_true", help="make the second folder from the first's JPEGs, scaled up")
    p.add_argument("--side", type=int, default=3024, help="with --make-large: their side in pixels")
    p.add_argument("--label", default="decode-speed")
    args = p.parse_args()
    if args.make_large:
        make_large(args.folders[0], args.folders[1], args.side)
        return
    ways = [("as cnnkit decodes", images.REDUCING_GAP, None), ("the same on one thread", images.REDUCING_GAP, 1),
            ("whole images, one thread (before)", 0.0, 1)]
    rows = ["| folder | images | megapixels | way | seconds | images/s | against before | pixels against before |",
            "|---|---|---|---|---|---|---|---|"]
    for root in args.folders:
        results = []
        for way, gap, workers in ways:
            with decoding(gap, workers):
                results.append(timed_load(root, args.size))
        before_s, before = results[-1]
        n = len(before)
        for (way, _, _), (seconds, got) in zip(ways, results):
            diff = np.abs(got.astype(np.int16) - before.astype(np.int16))
            rows.append(f"| {root.name} | {n} | {megapixels(root)} | {way} | {seconds:.1f} | {n / seconds:.0f} | "
                        f"{before_s / seconds:.2f}x | mean {diff.mean():.2f}, largest {diff.max()} |")
            print(rows[-1], flush=True)
    block = measured_header("decode_speed.py", " ".join(sys.argv[1:]), f"to {args.size} px, nothing cached",
                            f"Pillow {PIL.__version__}, ") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
