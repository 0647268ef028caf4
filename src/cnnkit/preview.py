"""A picture of what augmentation does: originals next to several augmented versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnkit.augment import Augment
from cnnkit.plotting import pyplot, save_figure


def pick_examples(labels: np.ndarray, num_classes: int, rows: int, seed: int) -> np.ndarray:
    """One image of each class (cycling through classes when rows > classes), seeded."""
    rng = np.random.default_rng(seed)
    picks = []
    for i in range(rows):
        candidates = np.flatnonzero(labels == i % num_classes)
        if len(candidates):
            picks.append(rng.choice(candidates))
    return np.asarray(picks)


def augment_grid(
    images: np.ndarray, labels: np.ndarray, classes: list[str], augment: Augment, path: Path, *,
    columns: int = 6, seed: int = 0, title: str = "",
) -> None:
    """Save a PNG grid: each row one image (class name on the left), first column the original."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).float() / 255
    versions = [x]
    for _ in range(columns):
        out = augment(x, g)
        if augment.mixes_labels:
            out, _ = augment.mix(out, torch.from_numpy(labels), len(classes), g)
        versions.append(out)
    rows = len(images)
    cell = 1.25 if images.shape[-1] <= 64 else 1.8
    fig, axes = pyplot().subplots(rows, columns + 1, figsize=(cell * (columns + 1) + 1.2, cell * rows + 0.7), dpi=100,
                             squeeze=False)
    grey = images.shape[1] == 1
    for r in range(rows):
        for c, batch in enumerate(versions):
            ax = axes[r, c]
            img = batch[r].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(c == 0)
                spine.set_color("#2b6cb0")
                spine.set_linewidth(2)
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=9)
        axes[r, 0].set_ylabel(classes[int(labels[r])], fontsize=9, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
