"""Near copies across splits (cnnkit.data.copies): what the check finds, what it misses, what it costs.

Three tables, for the thresholds as they are (`NEAR_BITS`, `NEAR_CORRELATION`):

- datasets: each one's test images that are near copies (not exact ones) of its training images, as a
  count and a share of the test split, and the seconds the check takes (the built-in datasets are loaded
  by name: Fashion-MNIST, CIFAR-10 with --cifar10; the rest are folders of class folders);
- changes: of each folder's first images (up to 150 of its test split), the share found again after a
  change a copy of a photo goes through (re-saved as JPEG, rescaled, brighter, turned, shifted, cropped);
- distinct: pairs of different images of a folder within 12 bits of each other by hash, a folder's test
  images against its training images (a false alarm would need those and a correlation of 0.99).

    python benchmarks/near_copies.py /tmp/data/flowers12 /tmp/data/catdog --fashion-mnist \
        --cifar10 cifar10-png.tar.gz

Writes the block `near-copies` of benchmarks/RESULTS.md (or --label).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from cnnkit.data import load_dataset
from cnnkit.data.copies import NEAR_BITS, NEAR_CORRELATION, Fingerprints, near_copies, nearest_by_hash
from cnnkit.data.images import decode_image
from run_recipes import measured_header, write_block

SIZE = 260  # the photos recipe's size


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def save(image: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue()))
    return save


def _cut(fraction: float, sides: str = "all") -> Callable[[Image.Image], Image.Image]:
    def cut(image: Image.Image) -> Image.Image:
        w, h = image.size
        dx, dy = round(w * fraction), round(h * fraction)
        box = (dx, dy, w - dx, h - dy) if sides == "all" else (dx, 0, w, h)
        return image.crop(box)
    return cut


CHANGES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "JPEG quality 50": _jpeg(50),
    "JPEG quality 20": _jpeg(20),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2)),
    "brightness 1.2": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "contrast 0.8": lambda im: ImageEnhance.Contrast(im).enhance(0.8),
    "turned 3 degrees": lambda im: im.rotate(3, resample=Image.Resampling.BILINEAR),
    "shifted 5%": _cut(0.05, "left"),
    "cropped 5% a side": _cut(0.05),
    "cropped 10% a side": _cut(0.10),
}


def dataset_row(name: str, ds) -> str:
    train, test = ds.splits["train"].images, ds.splits["test"].images
    t0 = time.perf_counter()
    near = len(near_copies(Fingerprints.of(test), Fingerprints.of(train)))
    seconds = time.perf_counter() - t0
    return (f"| {name} | {len(train)} | {len(test)} | {near} | {100 * near / len(test):.2f}% | {seconds:.2f} |")


def changed(images: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Each image changed, saved as PNG and decoded as cnnkit decodes a file."""
    out = []
    for image in images:
        buf = io.BytesIO()
        change(Image.fromarray(image.transpose(1, 2, 0))).save(buf, "PNG")
        out.append(decode_image(buf.getvalue(), image.shape[-1], image.shape[0]))
    return np.stack(out)


def found_after_changes(name: str, images: np.ndarray) -> list[str]:
    """Each change: the share of `images` whose changed version is a near copy of its original."""
    originals = Fingerprints.of(images)
    rows = []
    for change, fn in CHANGES.items():
        copies = Fingerprints.of(changed(images, fn))
        found = len(near_copies(copies, originals))
        bits, _ = nearest_by_hash(copies.bits, originals.bits)
        rows.append(f"| {name} | {change} | {len(images)} | {100 * found / len(images):.0f}% | {int(bits.median())} |")
        print(rows[-1], flush=True)
    return rows


def distinct_row(name: str, ds) -> str:
    test, train = Fingerprints.of(ds.splits["test"].images), Fingerprints.of(ds.splits["train"].images)
    bits, _ = nearest_by_hash(test.bits, train.bits)
    return (f"| {name} | {len(test.images)} x {len(train.images)} | {int(bits.min())} | "
            f"{int((bits <= 12).sum())} | {int((bits <= NEAR_BITS).sum())} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", type=Path, help="folders (or archives) of class folders with a test split")
    p.add_argument("--fashion-mnist", action="store_true", help="also Fashion-MNIST (its system copy or CNNKIT_HOME)")
    p.add_argument("--cifar10", type=Path, help="also CIFAR-10 from this archive or folder")
    p.add_argument("--distinct", nargs="*", type=Path, default=[],
                   help="folders known to hold no copies, for the third table (default: the folders)")
    p.add_argument("--label", default="near-copies")
    args = p.parse_args()
    sets = [("fashion-mnist", load_dataset("fashion-mnist"))] if args.fashion_mnist else []
    sets += [("cifar10", load_dataset("cifar10", args.cifar10))] if args.cifar10 else []
    folders = [(f.name, load_dataset("folder", f, image_size=SIZE)) for f in args.folders]
    rows = ["| dataset | training images | test images | near copies in test | share | seconds |", "|---|---|---|---|---|---|"]
    rows += [dataset_row(name, ds) for name, ds in sets + folders]
    print("\n".join(rows), flush=True)
    rows += ["", "| folder | change | images | found again | median bits apart |", "|---|---|---|---|---|"]
    for name, ds in folders:
        rows += found_after_changes(name, ds.splits["test"].images[:150])
    rows += ["", "| folder (no copies) | test x training images | fewest bits apart | pairs within 12 bits | "
             f"within {NEAR_BITS} |", "|---|---|---|---|---|"]
    rows += [distinct_row(f.name, load_dataset("folder", f, image_size=SIZE)) for f in args.distinct]
    block = measured_header("near_copies.py", " ".join(sys.argv[1:]),
                            f"NEAR_BITS {NEAR_BITS}, NEAR_CORRELATION {NEAR_CORRELATION}") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
