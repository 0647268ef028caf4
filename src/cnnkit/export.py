"""Export a run's model to ONNX with its preprocessing inside, and prove it agrees with PyTorch.

The exported graph takes uint8 images (N, C, H, W) at the run's data size, exactly what
`decode_image` produces, and does the float conversion, resize and normalisation itself: one
definition of preprocessing, now in the file. The same facts are in the model's metadata
(classes, sizes, channels, mean, std) for tools that read them.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cnnkit
from cnnkit.errors import CnnkitError
from cnnkit.inference import predict_logits
from cnnkit.fileio import atomic_path
from cnnkit.preprocess import Preprocess
from cnnkit.runs import LoadedRun

log = logging.getLogger(__name__)

OPSET = 18
# fp32 rounding differs between PyTorch's kernels and ONNX Runtime's (their sums run in other orders, and on
# another instruction set where PyTorch is capped), in proportion to the values: the logits may differ by this
# much times the largest logit's magnitude (at least 1).
MAX_ABS_DIFF = 1e-4
MIN_TOP1_AGREEMENT = 0.999


class ExportError(CnnkitError):
    """The exported model does not reproduce the PyTorch model."""


class WithPreprocessing(nn.Module):
    """uint8 images -> the model's logits, through the run's own Preprocess."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))


def metadata(run: LoadedRun) -> dict[str, str]:
    pre = run.preprocess
    return {
        "cnnkit_version": cnnkit.__version__,
        "run": run.run_dir.name,
        "classes": json.dumps(run.classes),
        "input": f"uint8 images (N, {pre.data_channels}, {pre.data_size}, {pre.data_size}), values 0-255",
        "preprocess": json.dumps(pre.to_dict()),
        "output": "logits (N, classes); softmax gives probabilities",
        "model": run.meta["model"],
    }


def export_onnx(run: LoadedRun, out: Path, sample: np.ndarray) -> dict[str, Any]:
    """Write `out` only if onnxruntime's logits on `sample` (real uint8 images) match PyTorch's."""
    import onnx
    import onnxruntime as ort

    pre = run.preprocess
    wrapper = WithPreprocessing(run.model.cpu().eval(), pre).eval()
    example = torch.from_numpy(np.ascontiguousarray(sample[:2]))
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # The mean and std become constants of the graph, which is what we want.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=65536)}},
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        proto = onnx.load(str(tmp))
        for key, value in metadata(run).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(["logits"], {"images": np.ascontiguousarray(sample[i:i + 256])})[0]
                              for i in range(0, len(sample), 256)])
        want = predict_logits(run.model, pre, sample, batch_size=256).numpy()
        max_diff = float(np.abs(got - want).max())
        limit = MAX_ABS_DIFF * max(1.0, float(np.abs(want).max()))
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        parity = {"samples": int(len(sample)), "max_abs_logit_diff": max_diff, "top1_agreement": agreement}
        if max_diff > limit or agreement < MIN_TOP1_AGREEMENT:
            raise ExportError(
                f"the ONNX model disagrees with PyTorch on {len(sample)} test images: max |logit difference| "
                f"{max_diff:.2e} (limit {limit:.1e}), same top-1 on {100 * agreement:.2f}% "
                f"(at least {100 * MIN_TOP1_AGREEMENT:.1f}% needed); nothing was written")
    log.info("wrote %s: parity on %d test images, max |diff| %.1e, top-1 agreement %.2f%%",
             out, len(sample), max_diff, 100 * agreement)
    return parity
