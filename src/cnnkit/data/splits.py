"""Seeded, stratified index splits: every class keeps its share in every split."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held_out) with about `fraction` of each class held out.

    Each class with at least two samples keeps at least one sample on each side.
    """
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        rest.append(idx[n_held:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of size about n (all indices if n >= len(labels))."""
    if n >= len(labels):
        return np.arange(len(labels))
    _, subset = stratified_split(labels, n / len(labels), seed)
    return subset
