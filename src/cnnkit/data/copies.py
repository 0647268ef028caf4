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

from cnnkit.data import Split, Splits

SPLITS = ("train", "validation", "test")
# A near copy: hashes at most NEAR_BITS of 64 apart, and 32x32 grey pixels correlated at NEAR_CORRELATION
# or more. Measured (benchmarks/near_copies.py): photos saved again as JPEG (quality 20-50), at half size or
# at 0.8 contrast all found again, at 1.2 brightness 89-95%; turned 3 degrees, shifted 5% or cropped 5% a
# side 0-1%; distinct photos of three folders at least 12 bits apart.
NEAR_BITS, NEAR_CORRELATION = 4, 0.99
NEAR_SHARE = 0.01  # near copies of under 1% of a split move its accuracy by under a point: not warned of
HASH_SIZE, HASH_FROM = 8, 32  # the 8x8 lowest frequencies of a 32x32 grey image's DCT (pHash's own sizes)


@dataclass
class CopiesFound:
    """What `check_copies` found: warnings for a person, and which test images are copies (exact or near)
    of images the model learns from, so that the test accuracy can also be given without them."""

    warnings: list[str]
    copied_test: np.ndarray  # indices into the test split


def copies_warnings(splits: Splits, classes: list[str], validation: bool = True, near: bool = True) -> list[str]:
    """`check_copies`' warnings."""
    return check_copies(splits, classes, validation, near).warnings


def check_copies(splits: Splits, classes: list[str], validation: bool = True, near: bool = True) -> CopiesFound:
    """What a person should know of the copies in these splits (nothing where there are none), with a few
    of the files where the splits know them (a folder's); near copies too with `near` (for a folder of
    one's own images: docs/data.md has the built-in datasets' counts). With `validation` false (a run that
    cross-validates on the training and validation images together, so the validation split chooses
    nothing of its own) copies between those two are not warned of: nor are copies within one split, which
    a photo set may hold by chance (flowers12 one pair in 720)."""
    groups = [g for g in _by_pixels(splits).values() if len(g) > 1]
    out = []
    copied = {i for g in groups if any(s != "test" for s, _, _, _ in g) for s, _, _, i in g if s == "test"}
    test = _copied(groups, "test", ("train", "validation"))
    if test:
        out.append(f"{len(test)} of the {len(splits.test)} test images {_are_copies(len(test))} of training or "
                   f"validation images (the same pixels{_examples(test)}): the test accuracy overstates what new "
                   "images would get; keep each picture in one split")
    val = _copied(groups, "validation", ("train",)) if validation else []
    if val:
        out.append(f"{len(val)} of the {len(splits.val)} validation images {_are_copies(len(val))} of training images"
                   f"{_examples(val, ' (', ')')}: validation chooses by pictures the model has learnt; keep each picture "
                   "in one split")
    if near:
        near_out, near_test = _near_warnings(splits, classes, validation)
        out += near_out
        copied |= near_test
    mixed = [g for g in groups if len({label for _, label, _, _ in g}) > 1]
    if mixed:
        pairs = sorted({" and ".join(classes[c] for c in sorted({label for _, label, _, _ in g})) for g in mixed})
        files = [(g[0][2], g[1][2]) for g in mixed]
        out.append(f"{len(mixed)} {'picture appears' if len(mixed) == 1 else 'pictures appear'} under more than one "
                   f"class ({'; '.join(pairs[:3])}{'; ...' if len(pairs) > 3 else ''}{_examples(files, '; ', '')}): "
                   "no model can get every copy right; keep each in one class folder")
    return CopiesFound(out, np.asarray(sorted(copied), dtype=np.int64))


def _near_warnings(splits: Splits, classes: list[str], validation: bool) -> tuple[list[str], set[int]]:
    """Near copies in the test split of the images learnt from, and (with `validation`) in the validation
    split of the training images, where they are at least NEAR_SHARE of the split; and any photo whose near
    copies are under more than one class."""
    train, val, test = (Fingerprints.of(s.images, s.names) for s in (splits.train, splits.val, splits.test))
    out = []
    pool = Fingerprints.joined([train, val])
    pairs = near_copies(test, pool)
    near = _named(pairs, test, pool)
    if near and len(near) >= NEAR_SHARE * len(splits.test):
        out.append(f"{len(near)} of the {len(splits.test)} test images {_are_near(len(near))} of training or validation "
                   f"images (the same photo saved again, rescaled, brighter or darker{_examples(near)}): the test "
                   "accuracy overstates what new photos would get; keep each photo and its versions in one split")
    near = _named(near_copies(val, train), val, train) if validation else []
    if near and len(near) >= NEAR_SHARE * len(splits.val):
        out.append(f"{len(near)} of the {len(splits.val)} validation images {_are_near(len(near))} of training images"
                   f"{_examples(near, ' (', ')')}: validation chooses by photos the model has learnt; keep each photo "
                   "and its versions in one split")
    every = Fingerprints.joined([train, val, test])
    labels = np.concatenate([splits.train.labels, splits.val.labels, splits.test.labels])
    return out + _near_in_two_classes(every, labels, classes), {i for i, _ in pairs}


def _near_in_two_classes(prints: Fingerprints, labels: np.ndarray, classes: list[str]) -> list[str]:
    """A warning where near copies of one photo (not all the same pixels: those are warned of as exact
    copies) are under more than one class."""
    groups: dict[int, list[int]] = {}
    for index, group in enumerate(copy_groups(prints)):
        groups.setdefault(int(group), []).append(index)
    mixed = [m for m in groups.values() if len(set(labels[m])) > 1
             and not all(np.array_equal(prints.images[m[0]], prints.images[i]) for i in m[1:])]
    if not mixed:
        return []
    kinds = sorted({" and ".join(classes[c] for c in sorted(set(labels[m]))) for m in mixed})
    names = prints.names
    files = [(None, None) if names is None else (str(names[m[0]]), str(names[m[1]])) for m in mixed]
    return [f"{len(mixed)} {'photo appears' if len(mixed) == 1 else 'photos appear'} under more than one class as near "
            f"copies ({'; '.join(kinds[:3])}{'; ...' if len(kinds) > 3 else ''}{_examples(files, '; ', '')}): no model "
            "can get every copy right; keep each photo and its versions in one class folder"]


Pair = tuple[str | None, str | None]  # the files of an image and of its copy, where known


def _named(pairs: list[tuple[int, int]], split: Fingerprints, pool: Fingerprints) -> list[Pair]:
    def name(prints: Fingerprints, i: int) -> str | None:
        return None if prints.names is None else str(prints.names[i])
    return [(name(split, i), name(pool, j)) for i, j in pairs]


def _examples(pairs: list[Pair], before: str = "; ", after: str = "") -> str:
    """A few of the pairs' files, for the person who has to move them ("" where the files are unknown)."""
    known = [(a, b) for a, b in pairs if a and b]
    if not known:
        return ""
    more = f", and {len(known) - 3} more" if len(known) > 3 else ""
    return f"{before}for example {'; '.join(f'{a} and {b}' for a, b in known[:3])}{more}{after}"


def _are_copies(n: int) -> str:
    return "is a copy" if n == 1 else "are copies"


def _are_near(n: int) -> str:
    return "is a near copy" if n == 1 else "are near copies"


class Joined:
    """Several arrays of images as one sequence of images, none copied: joining the splits' arrays copied each
    image (1 GB for 5,000 photos decoded at 260 px, 1.5 s a time on a 2-core CPU), where the checks here read a
    few of them."""

    def __init__(self, parts: list[np.ndarray | Joined]):
        self.parts = [a for p in parts for a in (p.parts if isinstance(p, Joined) else [p]) if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - self.starts[part]]


@dataclass
class Fingerprints:
    """Each image of a split small and grey (for the pixel check), its perceptual hash, and its file."""

    images: np.ndarray | Joined
    grey: torch.Tensor  # (N, HASH_FROM * HASH_FROM)
    bits: torch.Tensor  # (N, 64) bool
    names: np.ndarray | None = None

    @classmethod
    def of(cls, images: np.ndarray, names: np.ndarray | None = None) -> Fingerprints:
        grey = _grey(images)
        return cls(images, grey, _perceptual_hash(grey), names)

    @classmethod
    def joined(cls, prints: list[Fingerprints]) -> Fingerprints:
        named = [p for p in prints if len(p.images)]  # an empty split's names are no loss
        names = None if any(p.names is None for p in named) else np.concatenate(
            [p.names for p in named] or [np.zeros(0, dtype=object)])  # type: ignore[misc]
        return cls(Joined([p.images for p in prints]), torch.cat([p.grey for p in prints]),
                   torch.cat([p.bits for p in prints]), names)


def near_copies(split: Fingerprints, pool: Fingerprints) -> list[tuple[int, int]]:
    """(its index, its copy's in `pool`) of each of `split`'s images that is a near copy, not an exact one,
    of an image in `pool`: the nearest image by perceptual hash, if within NEAR_BITS, whose small grey
    pixels correlate with it at NEAR_CORRELATION or more."""
    if not len(split.images) or not len(pool.images):
        return []
    bits, nearest = nearest_by_hash(split.bits, pool.bits)
    near = _near(bits, split.grey, pool.grey[nearest])
    exact = np.asarray([np.array_equal(split.images[i], pool.images[int(j)]) for i, j in enumerate(nearest)], dtype=bool)
    return [(int(i), int(nearest[i])) for i in np.flatnonzero(near & ~exact)]


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


@dataclass
class CopyGroup:
    """Copies of one picture found in a dataset (exact, or near: saved again, rescaled, ...)."""

    files: list[str]  # each copy's file (or "<split> image <index>" where the files are unknown)
    splits: list[str]
    classes: list[str]

    @property
    def across(self) -> str:
        """What makes the group a problem: "classes" (no model gets both right), "splits" (one is
        learnt, the other judged), or "" (copies within one split and class: weight, not harm)."""
        return "classes" if len(set(self.classes)) > 1 else "splits" if len(set(self.splits)) > 1 else ""


def find_copy_groups(splits: dict[str, Split], classes: list[str]) -> list[CopyGroup]:
    """Every group of copies of one picture across the given splits (`cnnkit datasets DIR`), largest first."""
    named = [(name, split) for name, split in splits.items() if len(split)]
    if not named:
        return []
    where = [(name, i, split) for name, split in named for i in range(len(split))]
    groups: dict[int, list[int]] = {}
    for index, group in enumerate(copy_groups([split.images for _, split in named])):
        groups.setdefault(int(group), []).append(index)
    out = []
    for members in (m for m in groups.values() if len(m) > 1):
        rows = [where[i] for i in members]
        out.append(CopyGroup([str(split.names[i]) if split.names is not None else f"{name} image {i}" for name, i, split in rows],
                             [name for name, _, _ in rows], [classes[int(split.labels[i])] for _, i, split in rows]))
    return sorted(out, key=lambda g: (-len(g.files), g.files))


def copies_among(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Indices of `images` that are copies, exact or near, of an image in `pool` (`cnnkit evaluate` on
    new photos: which of them the run learnt from)."""
    if not len(images) or not len(pool):
        return np.zeros(0, dtype=np.int64)
    seen = {_digest(p) for p in pool}
    exact = {i for i, image in enumerate(images) if _digest(image) in seen}
    near = {i for i, _ in near_copies(Fingerprints.of(images), Fingerprints.of(pool))}
    return np.asarray(sorted(exact | near), dtype=np.int64)


def copy_groups(images: np.ndarray | list[np.ndarray] | Fingerprints) -> np.ndarray:
    """A group number for each image, one for all the copies of a photo (exact or near) among `images` (or
    several arrays of them taken one after the other, not joined: see `Joined`): for cross-validation's
    folds, which keep a group together (probe.fold_ids). Each image is joined to its nearest other image by
    hash where the two are near copies, and groups are what those links join."""
    if isinstance(images, list):
        images = Fingerprints.joined([Fingerprints.of(a) for a in images])
    prints = images if isinstance(images, Fingerprints) else Fingerprints.of(images)
    if len(prints.images) < 2:
        return np.arange(len(prints.images))
    bits, nearest = nearest_by_hash(prints.bits, prints.bits, others_only=True)
    parent = np.arange(len(prints.images))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.flatnonzero(_near(bits, prints.grey, prints.grey[nearest])):
        parent[root(i)] = root(int(nearest[i]))
    return np.asarray([root(i) for i in range(len(prints.images))])


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


def _near(bits: torch.Tensor, grey: torch.Tensor, nearest_grey: torch.Tensor) -> np.ndarray:
    """Which images are near copies of their nearest by hash: within NEAR_BITS, and their small grey
    pixels correlated at NEAR_CORRELATION or more."""
    correlation = (_standardized(grey) * _standardized(nearest_grey)).sum(1)
    return ((bits <= NEAR_BITS) & (correlation >= NEAR_CORRELATION)).numpy()


def _standardized(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


Seen = tuple[str, int, str | None, int]  # an image's split, label, file (or None) and index in its split


def _by_pixels(splits: Splits) -> dict[bytes, list[Seen]]:
    """Every image (`Seen`), by a digest of its pixels."""
    seen: dict[bytes, list[Seen]] = {}
    for name, split in zip(SPLITS, (splits.train, splits.val, splits.test)):
        files = split.names if split.names is not None else [None] * len(split)
        for index, (image, label, file) in enumerate(zip(split.images, split.labels, files)):
            seen.setdefault(_digest(image), []).append((name, int(label), None if file is None else str(file), index))
    return seen


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()


def _copied(groups: list[list[Seen]], split: str, others: tuple[str, ...]) -> list[Pair]:
    """(its file, a copy's file) of each image of `split` whose pixels are also among the `others` splits'."""
    out = []
    for g in groups:
        copies = [file for s, _, file, _ in g if s in others]
        if copies:
            out += [(file, copies[0]) for s, _, file, _ in g if s == split]
    return out
