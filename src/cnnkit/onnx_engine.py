"""Prediction with onnxruntime only: numpy, Pillow and an exported model; torch is never imported.

The exported graph holds the preprocessing, so all this needs from the model's metadata is the
size and channels to decode images to, and the class names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import RunError


class OnnxModel:
    """An exported model under onnxruntime: the `predict.Engine` interface without torch."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise RunError(f"{path}: no ONNX model here; create it with `cnnkit export RUN`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: list[str] = json.loads(meta["classes"])
            self.preprocess: dict[str, Any] = json.loads(meta["preprocess"])
        except (KeyError, json.JSONDecodeError):
            raise RunError(f"{path}: not a cnnkit export (its metadata has no classes and preprocessing)") from None
        self.path = path

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]

    def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        z = self.logits(images).astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p, axis=1)[:, :k]
        return [[(self.classes[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]
