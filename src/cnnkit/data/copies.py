"""Copies of one picture in a dataset: the same decoded pixels in the test split and among the images
the model learns from, or under two classes.

A folder of one's own photos often holds the same photo twice (copied into `train/` and `test/`, into
two class folders, or saved twice under other names). A test image the model learnt from makes the
test accuracy a promise new photos will not keep; a picture under two classes is a mistake no model
can get right both times. Written here: a hash of each image's decoded pixels and a dictionary, a
fraction of a second for CIFAR-10's 60,000 images; no library looks for copies across a dataset's
splits. Only exact copies are found (at the size the images were decoded to, so a file and a copy of
it under another name are; a photo saved again as another JPEG, or the next shot of a burst, is not).
"""

from __future__ import annotations

import hashlib

import numpy as np

from cnnkit.data import Splits

SPLITS = ("train", "validation", "test")


def copies_warnings(splits: Splits, classes: list[str], validation: bool = True) -> list[str]:
    """What a person should know of the copies in these splits (nothing where there are none). With
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
    mixed = [sorted({label for _, label in g}) for g in groups if len({label for _, label in g}) > 1]
    if mixed:
        pairs = sorted({" and ".join(classes[c] for c in labels) for labels in mixed})
        out.append(f"{len(mixed)} {'picture appears' if len(mixed) == 1 else 'pictures appear'} under more than one "
                   f"class ({'; '.join(pairs[:3])}"
                   f"{'; ...' if len(pairs) > 3 else ''}): no model can get every copy right; keep each in one class folder")
    return out


def _are_copies(n: int) -> str:
    return "is a copy" if n == 1 else "are copies"


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
