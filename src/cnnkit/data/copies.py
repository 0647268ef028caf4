"""Copies of one picture in a dataset: the same decoded pixels, or the same photo saved again, in the test
split and among the images the model learns from, or under two classes.

A folder of one's own photos often holds the same photo twice (copied into `train/` and `test/`, into
two class folders, or saved twice under other names, sizes or qualities). A test image the model learnt
from makes the test accuracy a promise new photos will not keep; a picture under two classes is a
mistake no model can get right both times. Exact copies are found by a hash of each image's decoded
pixels (at the size the images were decoded to, so a file and a copy of it under another name are).
Near copies (the same photo re-saved as another JPEG, rescaled, brighter or darker) by a perceptual hash
and a check of the pixels, strict enough that distinct photos are never taken for copies: a photo turned
by 3 degrees, shifted or cropped by 5%, or the next shot of a burst, is not found.

Written here, not taken from a library: `imagehash` hashes one PIL image at a time and finds nothing
across a dataset's splits; here the images are decoded arrays already, and a batched DCT hash and one
matrix product find each test image's nearest training image by hash in about 2.4 s for Fashion-MNIST's
70,000 images.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.data import Splits

SPLITS = ("train", "validation", "test")
# A near copy: hashes at most NEAR_BITS of 64 apart, and 32x32 grey pixels correlated at NEAR_CORRELATION
# or more. Measured (benchmarks/near_copies.py): photos saved again as JPEG (quality 20-50), at half size or
# at 0.8 contrast all found again, at 1.2 brightness 89-95%; turned 3 degrees, shifted 5% or cropped 5% a
# side 0-1%; distinct photos of three folders at least 12 bits apart.
NEAR_BITS, NEAR_CORRELATION = 4, 0.99
NEAR_SHARE = 0.01  # near copies of under 1% of a split move its accuracy by under a point: not warned of
HASH_SIZE, HASH_FROM = 8, 32  # the 8x8 lowest frequencies of a 32x32 grey image's DCT (pHash's own sizes)


def copies_warnings(splits: Splits, classes: list[str], validation: bool = True, near: bool = True) -> list[str]:
    """What a person should know of the copies in these splits (nothing where there are none); near copies
    too with `near` (for a folder of one's own images: docs/data.md has the built-in datasets' counts). With
    `validation` false (a run that cross-validates on the training and validation images together, so
    the validation split chooses nothing of its own) copies between those two are not warned of: nor are
    copies within one split, which a photo set may hold by chance (flowers12 one pair in 720)."""
    groups = [g for g in _by_pixels(splits).values() if len(g) > 1]
    out = []
    test = _copied(groups, "test", ("train", "validation"))
    if test:
        out.append(f"{test} of the {len(splits.test)} test images {_are_copies(test)} of training or validation images "
                   "(the same pixels): the test accuracy overstates what new images would get; keep each picture in one "
                   "split")
    val = _copied(groups, "validation", ("train",)) if validation else 0
    if val:
        out.append(f"{val} of the {len(splits.val)} validation images {_are_copies(val)} of training images: "
                   "validation chooses by pictures the model has learnt; keep each picture in one split")
    if near:
        out += _near_warnings(splits, validation)
    mixed = [sorted({label for _, label in g}) for g in groups if len({label for _, label in g}) > 1]
    if mixed:
        pairs = sorted({" and ".join(classes[c] for c in labels) for labels in mixed})
        out.append(f"{len(mixed)} {'picture appears' if len(mixed) == 1 else 'pictures appear'} under more than one "
                   f"class ({'; '.join(pairs[:3])}"
                   f"{'; ...' if len(pairs) > 3 else ''}): no model can get every copy right; keep each in one class folder")
    return out


def _near_warnings(splits: Splits, validation: bool) -> list[str]:
    """Near copies in the test split of the images learnt from, and (with `validation`) in the validation
    split of the training images, where they are at least NEAR_SHARE of the split."""
    train, val, test = (Fingerprints.of(s.images) for s in (splits.train, splits.val, splits.test))
    out = []
    near = near_copies(test, Fingerprints.joined([train, val]))
    if near and near >= NEAR_SHARE * len(splits.test):
        out.append(f"{near} of the {len(splits.test)} test images {_are_near(near)} of training or validation images (the "
                   "same photo saved again, rescaled, brighter or darker): the test accuracy overstates what new "
                   "photos would get; keep each photo and its versions in one split")
    near = near_copies(val, train) if validation else 0
    if near and near >= NEAR_SHARE * len(splits.val):
        out.append(f"{near} of the {len(splits.val)} validation images {_are_near(near)} of training images: "
                   "validation chooses by photos the model has learnt; keep each photo and its versions in one split")
    return out


def _are_copies(n: int) -> str:
    return "is a copy" if n == 1 else "are copies"


def _are_near(n: int) -> str:
    return "is a near copy" if n == 1 else "are near copies"


@dataclass
class Fingerprints:
    """Each image of a split small and grey (for the pixel check) and its perceptual hash."""

    images: np.ndarray
    grey: torch.Tensor  # (N, HASH_FROM * HASH_FROM)
    bits: torch.Tensor  # (N, 64) bool

    @classmethod
    def of(cls, images: np.ndarray) -> Fingerprints:
        grey = _grey(images)
        return cls(images, grey, _perceptual_hash(grey))

    @classmethod
    def joined(cls, prints: list[Fingerprints]) -> Fingerprints:
        return cls(*(np.concatenate([p.images for p in prints]),
                     torch.cat([p.grey for p in prints]), torch.cat([p.bits for p in prints])))


def near_copies(split: Fingerprints, pool: Fingerprints) -> int:
    """How many of `split`'s images are near copies, not exact ones, of an image in `pool`: the nearest
    image by perceptual hash, if within NEAR_BITS, whose small grey pixels correlate with it at
    NEAR_CORRELATION or more."""
    if not len(split.images) or not len(pool.images):
        return 0
    bits, nearest = nearest_by_hash(split.bits, pool.bits)
    correlation = (_standardized(split.grey) * _standardized(pool.grey[nearest])).sum(1)
    near = ((bits <= NEAR_BITS) & (correlation >= NEAR_CORRELATION)).numpy()
    exact = np.asarray([np.array_equal(a, b) for a, b in zip(split.images, pool.images[nearest.numpy()])], dtype=bool)
    return int((near & ~exact).sum())


def _grey(images: np.ndarray, batch_bytes: int = 1 << 26) -> torch.Tensor:
    """(N, HASH_FROM * HASH_FROM) grey images, each resized with antialiasing, a few MB at a time."""
    per_batch = max(1, batch_bytes // max(1, images[0].size * 4)) if len(images) else 1
    out = [torch.zeros(0, HASH_FROM * HASH_FROM)]
    for start in range(0, len(images), per_batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + per_batch])).float().mean(1, keepdim=True)
        out.append(F.interpolate(x, size=(HASH_FROM, HASH_FROM), mode="bilinear", antialias=True,
                                 align_corners=False).flatten(1))
    return torch.cat(out)


def _perceptual_hash(grey: torch.Tensor) -> torch.Tensor:
    """(N, 64) bits: the lowest 8x8 frequencies of the 2-D DCT-II, each above or below their median (pHash)."""
    n = HASH_FROM
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    dct = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)).float()  # unscaled: the median test does not need it
    low = (dct @ grey.view(-1, n, n) @ dct.T)[:, :HASH_SIZE, :HASH_SIZE].flatten(1)
    return low > low.median(1, keepdim=True).values


def copy_groups(images: np.ndarray) -> np.ndarray:
    """A group number for each image, one for all the copies of a photo (exact or near) among `images`:
    for cross-validation's folds, which keep a group together (probe.fold_ids). Each image is joined to
    its nearest other image by hash where the two are near copies, and groups are what those links join."""
    if len(images) < 2:
        return np.arange(len(images))
    prints = Fingerprints.of(images)
    bits, nearest = nearest_by_hash(prints.bits, prints.bits, others_only=True)
    correlation = (_standardized(prints.grey) * _standardized(prints.grey[nearest])).sum(1)
    parent = np.arange(len(images))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.flatnonzero(((bits <= NEAR_BITS) & (correlation >= NEAR_CORRELATION)).numpy()):
        parent[root(i)] = root(int(nearest[i]))
    return np.asarray([root(i) for i in range(len(images))])


def nearest_by_hash(a: torch.Tensor, b: torch.Tensor, chunk: int = 128,
                    others_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each hash in `a`: the fewest bits by which one in `b` differs, and which (with `others_only`,
    `a` is `b` and each hash's own place is passed over). As +-1 vectors, two hashes' product is 64 less
    twice the bits that differ, so one matrix product compares them all."""
    pm_a, pm_b = a.float() * 2 - 1, (b.float() * 2 - 1).T.contiguous()
    bits, nearest = [], []
    for start in range(0, len(a), chunk):
        products = pm_a[start:start + chunk] @ pm_b
        if others_only:
            rows = torch.arange(len(products))
            products[rows, rows + start] = -math.inf
        agree, index = products.max(1)
        bits.append(((a.shape[1] - agree) / 2).round().int())
        nearest.append(index)
    return torch.cat(bits), torch.cat(nearest)


def _standardized(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _by_pixels(splits: Splits) -> dict[bytes, list[tuple[str, int]]]:
    """(split, label) of every image, by a digest of its pixels."""
    seen: dict[bytes, list[tuple[str, int]]] = {}
    for name, split in zip(SPLITS, (splits.train, splits.val, splits.test)):
        for image, label in zip(split.images, split.labels):
            digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()
            seen.setdefault(digest, []).append((name, int(label)))
    return seen


def _copied(groups: list[list[tuple[str, int]]], split: str, others: tuple[str, ...]) -> int:
    """Images of `split` whose pixels are also among the `others` splits' images."""
    return sum(sum(s == split for s, _ in g) for g in groups if any(s in others for s, _ in g))
