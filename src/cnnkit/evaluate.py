"""Metrics of a trained model: accuracy, loss, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.augment import tta_views
from cnnkit.preprocess import Preprocess


def cpu_has_native_bf16() -> bool:
    """bf16 instructions (AVX512-BF16 or AMX): there bf16 autocast runs convolutions 1.3-2x faster;
    without them oneDNN emulates bf16, 15 times slower than fp32 (step-speed-bf16-avx2)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: stay with what is known to be fast
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it (else fp16) and on CPUs with native bf16; else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_inference_settings(cfg: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The precision, memory format and batch size of a run's own test evaluation at the end of
    training, so that `cnnkit evaluate` and `cnnkit report` reproduce its numbers (bf16 and fp32
    logits differ enough to flip a few borderline images: 93.88% against 93.85% on cifar10-fast)."""
    device = torch.device(device)
    precision = resolve_precision(cfg.get("precision", "fp32"), device)
    if precision == "fp16" and device.type != "cuda":  # a GPU run's fp16, evaluated on the CPU
        precision = "fp32"
    return {"precision": precision, "channels_last": bool(cfg.get("channels_last", False)),
            "batch_size": cfg.get("eval_batch_size", 1024)}


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    preprocess: Preprocess,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    tta: str = "none",
) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images (N, C, H, W), in batches; with test-time
    augmentation (`flip`, `flip-shift`) the logits of the views are averaged. `channels_last`
    puts the inputs, and the model in place, in channels-last memory format."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.as_tensor(images)
    out = []
    for start in range(0, len(images), batch_size):
        views = tta_views(preprocess.to_float(images[start : start + batch_size].to(device)), tta)
        total = None
        for view in views:
            x = preprocess.finish(view)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(x).float()
            total = logits if total is None else total + logits
        out.append((total / len(views)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnkit.fileio import save_with

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
    save_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
