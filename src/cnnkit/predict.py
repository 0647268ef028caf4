"""Classify image files with a trained model, through an engine: the run's PyTorch model
(`TorchEngine`) or its ONNX export (`onnx_engine.OnnxModel`, which never imports torch). Both
decode with the run's own size and channels and return the top classes; `predict_files`, the
command line and the server work with either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cnnkit.data.images import decode_images
from cnnkit.errors import ImageDecodeError, RunError


class Engine(Protocol):
    name: str
    classes: list[str]
    preprocess: dict[str, Any]  # at least data_size and data_channels: what images are decoded to

    def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]: ...


class TorchEngine:
    """A run's PyTorch model (the best checkpoint unless told), predicting as the run was tested:
    its test-time augmentation, precision and memory format."""

    name = "torch"

    def __init__(self, run_dir: Path, checkpoint: str = "best", device: str = "cpu", threads: int | None = None):
        import torch

        from cnnkit.inference import InferenceSettings
        from cnnkit.runs import RunRecord, load_run

        if threads:
            torch.set_num_threads(threads)
        self.run = load_run(run_dir, checkpoint, device)
        self.device = device
        self.classes = self.run.classes
        self.preprocess = self.run.preprocess.to_dict()
        settings = RunRecord(**self.run.meta.get("record", {})).settings(self.run.meta.get("config", {}))
        self.tta = settings.get("tta", "none")
        self.inference = InferenceSettings.for_run(settings, device).in_torch()  # PyTorch's, as the name says

    def logits(self, images: np.ndarray) -> Any:
        from cnnkit.inference import predict_logits

        return predict_logits(self.run.model, self.run.preprocess, images, device=self.device, tta=self.tta,
                              **self.inference.kwargs())

    def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        probs = self.logits(images).softmax(dim=1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[(self.classes[i], float(p)) for p, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]


def load_engine(run: Path, engine: str = "auto", *, checkpoint: str = "best", device: str = "cpu",
                threads: int | None = None) -> Engine:
    """`run` is a run folder or an .onnx file. `auto`: the run's ONNX export if it has one."""
    from cnnkit.onnx_engine import OnnxModel

    run = Path(run)
    if run.suffix == ".onnx":
        return OnnxModel(run, threads)
    onnx_path = run / "export" / "model.onnx"
    if engine == "onnx" or (engine == "auto" and onnx_path.is_file()):
        return OnnxModel(onnx_path, threads)
    if engine not in ("auto", "torch"):
        raise RunError(f"engine must be auto, onnx or torch; got {engine!r}")
    return TorchEngine(run, checkpoint, device, threads)


def predict_files(engine: Engine, paths: list[Path], top_k: int = 5) -> list[dict[str, Any]]:
    """One result per file: {"path", "top": [{"class", "probability"}, ...]} or {"path", "error"}."""
    results: list[dict[str, Any]] = []
    good, arrays = [], []
    pre = engine.preprocess
    for path, decoded in zip(paths, decode_images(paths, pre["data_size"], pre["data_channels"])):
        if isinstance(decoded, ImageDecodeError):
            results.append({"path": str(path), "error": decoded.reason})
        else:
            arrays.append(decoded)
            good.append(len(results))
            results.append({"path": str(path)})
    if arrays:
        for i, top in zip(good, engine.top_k(np.stack(arrays), top_k)):
            results[i]["top"] = [{"class": c, "probability": p} for c, p in top]
    return results
