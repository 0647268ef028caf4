"""Datasets: find, decode (once, cached) and split. Knows nothing of models."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cnnkit.data import cifar10, fashion_mnist, folder
from cnnkit.data.dataset import Dataset, Split
from cnnkit.data.splits import stratified_split, stratified_subset
from cnnkit.errors import ConfigError, DataError, NoImagesFound

log = logging.getLogger(__name__)

DATASETS = {
    "fashion-mnist": "Fashion-MNIST: 70k 28x28 grayscale clothing images, 10 classes",
    "cifar10": "CIFAR-10: 60k 32x32 colour photos, 10 classes",
    "folder": "your own images: class folders, optionally under train/ val/ test/ (--data-dir)",
}
ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "cifar-10": "cifar10", "cifar": "cifar10"}


def canonical_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return name


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
    allow_download: bool = True,
) -> Dataset:
    """Load a dataset by name. `image_size` and `channels` apply to folder datasets only."""
    name = canonical_name(name)
    path = Path(data_dir).expanduser() if data_dir else None
    if name == "fashion-mnist":
        return fashion_mnist.load(path, allow_download=allow_download)
    if name == "cifar10":
        return cifar10.load(path, allow_download=allow_download, skip_bad=skip_bad_images)
    if path is None:
        raise ConfigError("--dataset folder needs --data-dir: a folder of class folders (or a .zip or .tar.gz of one)")
    return folder.load(path, size=image_size or 64, channels=channels or 3, skip_bad=skip_bad_images)


def where_available() -> dict[str, str | None]:
    """For `cnnkit datasets`: where each dataset would be loaded from without downloading."""
    fm = fashion_mnist.find(None)
    cf = cifar10.find(None)
    return {
        "fashion-mnist": str(fm) if fm else None,
        "cifar10": str(cf) if cf else None,
        "folder": "any directory given with --data-dir",
    }


@dataclass
class Guess:
    """What a --data-dir holds, as `guess_dataset` reads it from names alone."""

    name: str  # a dataset name, as --dataset takes it
    why: str  # for the log: what was found
    images: int | None  # image files found (a folder or an archive of one), else None


def guess_dataset(data_dir: str | Path) -> Guess:
    """The dataset a --data-dir holds, for `cnnkit train --data-dir X` with neither --dataset nor --recipe.

    Without it, a folder of photos went to the default dataset, Fashion-MNIST, whose loader then found
    the system's copy: a user's own photos trained nothing of theirs. Fashion-MNIST's four files and
    CIFAR-10's official archive are known by name; anything else must be class folders of images (or an
    archive of them), and CIFAR-10's ten class folders are CIFAR-10."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"--data-dir {path}: no such file or directory")
    if path.is_dir() and fashion_mnist.holds(path):
        return Guess("fashion-mnist", "Fashion-MNIST's four IDX files", None)
    if cifar10.official_archive(path) is not None:
        return Guess("cifar10", f"CIFAR-10's official archive ({cifar10.ARCHIVE})", None)
    if not (path.is_dir() or folder.is_archive(path)):
        raise DataError(f"--data-dir {path}: expected a directory of class folders (or a .zip/.tar.gz of one), "
                        "or one holding Fashion-MNIST's IDX files or CIFAR-10's archive")
    try:
        layout = folder.list_layout(path)
    except NoImagesFound as e:  # nothing of a folder dataset: perhaps a built-in one's files, misplaced
        raise DataError(f"{e}\n(--data-dir without --dataset: neither Fashion-MNIST's IDX files nor CIFAR-10's "
                        "archive are there either; name --dataset to load one of those)") from None
    images = layout.image_count()
    if layout.classes == cifar10.CLASSES:
        return Guess("cifar10", f"CIFAR-10's ten class folders ({images} images)", images)
    return Guess("folder", f"{images} images in {len(layout.classes)} class folders", images)


def count_images(data_dir: str | Path | None) -> int:
    """Image files in a folder (or an archive) of class folders, by their names: enough to choose a
    recipe before anything is decoded; 0 where there is nothing to count (the loader then says why)."""
    path = Path(data_dir).expanduser() if data_dir else None
    if path is None or not (path.is_dir() or folder.is_archive(path)):
        return 0
    return folder.list_layout(path).image_count()


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    notes: list[str]


def make_splits(
    ds: Dataset,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    final_fit: bool = False,
) -> Splits:
    """Train, validation and test splits. Validation is carved from train (seeded, stratified)
    unless the source has its own; the test split is kept for final evaluation only. With
    `final_fit` the validation images join the training ones (the split is still returned, so
    the loop and its hooks work as ever, but it no longer chooses anything)."""
    notes = list(ds.notes)
    train = ds.splits["train"]
    test = ds.splits.get("test")
    val = ds.splits.get("val")
    if test is None and val is not None:
        test, val = val, None
        notes.append("no test/ split: the val/ split is held out for final evaluation; validation is carved from train")
    if test is None or val is None:
        _check_splittable(ds, train)
    if test is None:
        rest, held = stratified_split(train.labels, test_fraction, seed + 1)
        train, test = train.subset(rest), train.subset(held)
        notes.append(f"no test split: held out {len(test)} train images ({test_fraction:.0%}, stratified) for final evaluation")
    if val is None:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        rest, held = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(rest), train.subset(held)
    if max_train_samples:
        train = train.subset(stratified_subset(train.labels, max_train_samples, seed))
    if max_eval_samples:
        val = val.subset(stratified_subset(val.labels, max_eval_samples, seed))
        test = test.subset(stratified_subset(test.labels, max_eval_samples, seed))
    for split_name, split in (("train", train), ("validation", val), ("test", test)):
        if len(split) == 0:
            raise DataError(f"{ds.name}: the {split_name} split is empty; add images or lower the split fractions")
    if final_fit:
        train = Split.joined([train, val])
        notes.append(f"final fit: the {len(val)} validation images train too; the last epoch is tested")
    return Splits(train, val, test, notes)


def _check_splittable(ds: Dataset, train: Split) -> None:
    """Carving a held-out split needs two images of every class, else a class vanishes from it."""
    counts = train.class_counts(len(ds.classes))
    few = [f"{c} ({n})" for c, n in zip(ds.classes, counts) if n < 2]
    if few:
        raise DataError(
            f"{ds.source}: class(es) {', '.join(few)} have fewer than 2 training images, so they cannot be "
            "split into training and validation. Add images to those class folders (a few dozen each is a "
            "sensible minimum), or remove the folders."
        )


def imbalance_ratio(split: Split, num_classes: int) -> float:
    counts = split.class_counts(num_classes)
    return float(counts.max() / max(counts.min(), 1))


__all__ = ["Dataset", "Split", "Splits", "load_dataset", "make_splits", "where_available", "DATASETS"]
