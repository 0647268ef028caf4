"""Metrics of a trained model: accuracy, loss, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

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
