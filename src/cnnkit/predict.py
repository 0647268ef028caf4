"""Classify image files with a trained run, through the run's own preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.data.images import decode_image
from cnnkit.errors import ImageDecodeError
from cnnkit.evaluate import predict_logits
from cnnkit.runs import LoadedRun


def predict_images(run: LoadedRun, images: np.ndarray, top_k: int = 5, device: str = "cpu") -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for uint8 images already decoded to the run's data format."""
    tta = run.meta.get("config", {}).get("tta", "none")  # predict as the run was evaluated
    probs = torch.softmax(predict_logits(run.model, run.preprocess, images, device=device, tta=tta), dim=1)
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[(run.classes[i], float(p)) for p, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]


def predict_files(run: LoadedRun, paths: list[Path], top_k: int = 5, device: str = "cpu") -> list[dict[str, Any]]:
    """One result per file: {"path", "top": [(class, prob), ...]} or {"path", "error"} for bad files."""
    pre = run.preprocess
    results: list[dict[str, Any]] = []
    good, arrays = [], []
    for path in paths:
        try:
            arrays.append(decode_image(path, pre.data_size, pre.data_channels))
            good.append(len(results))
            results.append({"path": str(path)})
        except ImageDecodeError as e:
            results.append({"path": str(path), "error": e.reason})
    if arrays:
        for i, top in zip(good, predict_images(run, np.stack(arrays), top_k, device)):
            results[i]["top"] = [{"class": c, "probability": p} for c, p in top]
    return results
