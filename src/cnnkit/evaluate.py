"""Metrics of a trained model: accuracy, loss, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.plotting import pyplot, save_figure


def classification_metrics(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, classes: list[str]) -> dict[str, Any]:
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    k = len(classes)
    pred = logits.argmax(1)
    cm = torch.bincount(labels_t * k + pred, minlength=k * k).reshape(k, k).numpy()
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / max(len(labels_t), 1)),
        "loss": float(F.cross_entropy(logits, labels_t)) if len(labels_t) else float("nan"),
        "samples": int(len(labels_t)),
        "macro_f1": float(f1.mean()),
        "per_class": [
            {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        ],
        "confusion_matrix": cm.tolist(),
    }


def accuracy_without(logits: torch.Tensor, labels: np.ndarray, left_out: np.ndarray) -> float | None:
    """Accuracy on the images not `left_out` (indices: copies of training images, data.copies); None if none are left."""
    rest = np.setdiff1d(np.arange(len(labels)), left_out)
    return float((logits[rest].argmax(1).cpu().numpy() == labels[rest]).mean()) if len(rest) else None


def without_copies(summary: dict) -> str:
    """'98.16% (217 test images: 23 copies of training images left out)': a run's test accuracy without the test
    images that are copies of what it learnt from (summary.json's keys), for the closing table and the report."""
    n = summary["test_copies_left_out"]
    return (f"{100 * summary['test_accuracy_without_copies']:.2f}% ({summary['test_samples'] - n} test images: "
            f"{n} cop{'y' if n == 1 else 'ies'} of training images left out)")


def plot_confusion_matrix(cm: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """Two panels: counts, and row-normalised (each row sums to 1: the recall of that class)."""
    plt = pyplot()
    counts = np.asarray(cm)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.4 + 0.55 * k), 1.5 + 0.5 * k), dpi=100)
    for ax, data, name, fmt in ((axes[0], counts, "counts", "{:d}"), (axes[1], rows, "row-normalised (recall)", "{:.2f}")):
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def accuracy_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval of an accuracy measured on n images: on 240 test images 97.5% means
    95.5-98.8%, so two small-set results closer than that are not told apart."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


SMALL_SPLIT = 200  # images: below, a split's accuracy is uncertain by several points (accuracy_interval)


def small_split_warnings(val_images: int, test_images: int, test_accuracy: float) -> list[str]:
    """What a person should know when the validation or test split is too small to trust."""
    out = []
    if test_images < SMALL_SPLIT:
        lo, hi = accuracy_interval(test_accuracy, test_images)
        out.append(f"only {test_images} test images: the test accuracy {100 * test_accuracy:.1f}% lies, with 95% "
                   f"confidence, between {100 * lo:.1f}% and {100 * hi:.1f}%")
    if 0 < val_images < SMALL_SPLIT:
        out.append(f"only {val_images} validation images: they can tell apart epochs or settings only by several "
                   "points; on small sets a recipe that cross-validates (photos) chooses better")
    return out
