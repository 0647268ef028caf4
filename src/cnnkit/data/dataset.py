"""In-memory datasets: uint8 image arrays (N, C, H, W), int64 labels, class names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cnnkit.errors import DataError


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)
    names: np.ndarray | None = None  # each image's file (a folder's, relative to it), for people; else None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.names is not None and len(self.names) != len(self.labels):
            raise DataError(f"{len(self.names)} file names for {len(self.labels)} images")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx], None if self.names is None else self.names[idx])

    @staticmethod
    def joined(splits: list[Split]) -> Split:
        """The splits one after another (file names where every one that holds images has them)."""
        named = [s for s in splits if len(s)]  # an empty split's names are no loss
        names = None if any(s.names is None for s in named) else np.concatenate(
            [s.names for s in named] or [np.zeros(0, dtype=object)])  # type: ignore[misc]
        return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]), names)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """--class-balance weights: each class's images weigh n / (k * its count), so every class weighs alike in a loss."""
    return len(labels) / (num_classes * np.maximum(np.bincount(labels, minlength=num_classes), 1))


@dataclass
class Dataset:
    name: str
    classes: list[str]
    splits: dict[str, Split]  # "train", and "val" and/or "test" where the source has them
    source: str  # where it was found, for people
    notes: list[str] = field(default_factory=list)  # what the loader decided, for people

    def __post_init__(self) -> None:
        n = len(self.classes)
        for split_name, split in self.splits.items():
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= n):
                raise DataError(
                    f"{self.name} {split_name}: labels must lie in 0..{n - 1} for {n} classes, "
                    f"found {split.labels.min()}..{split.labels.max()}"
                )

    @property
    def channels(self) -> int:
        return self.splits["train"].images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.splits["train"].images.shape[2:])  # type: ignore[return-value]
