"""The one inference loop: uint8 images in batches -> test-time views -> preprocessing -> model,
in the run's precision and memory format. Evaluation, validation during training, the report's
robustness section, prediction and the linear probe's feature extraction all go through it, so
that every number a run reports is computed the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit import fold_batchnorm
from cnnkit.augment import tta_views
from cnnkit.preprocess import Preprocess
from cnnkit.progress import track
from cnnkit.runtime import autocast, resolve_precision


@dataclass(frozen=True)
class InferenceSettings:
    """How a run evaluates: the precision, memory format and batch size of its own test evaluation,
    so that `cnnkit evaluate` and `cnnkit report` reproduce its numbers (bf16 and fp32 logits differ
    enough to flip a few borderline images: 93.88% against 93.85% on cifar10-fast)."""

    precision: str = "fp32"
    channels_last: bool = False
    batch_size: int = 1024
    tta_below: float | None = None  # test-time views only for the images less sure than this
    engine: str = "torch"  # or the CPU's "onnxruntime" (cnnkit.onnx_forward, fp32), "compile" (cnnkit.compiled_forward),
    # "int8" (cnnkit.int8_forward)

    @classmethod
    def for_run(cls, cfg: dict[str, Any], device: torch.device | str) -> InferenceSettings:
        device = torch.device(device)
        precision = resolve_precision(cfg.get("precision", "fp32"), device)
        if precision == "fp16" and device.type != "cuda":  # a GPU run's fp16, evaluated on the CPU
            precision = "fp32"
        return cls(precision, bool(cfg.get("channels_last", False)), int(cfg.get("eval_batch_size", 1024)),
                   cfg.get("tta_below"), inference_engine(cfg, device))

    def in_torch(self) -> InferenceSettings:
        """The same settings with PyTorch's forward passes, whatever the engine: for validation during
        training (the weights change every epoch) and for `cnnkit predict`/`serve` (a few images a
        request, where hashing the weights for ONNX Runtime's session would cost more than it saves)."""
        return replace(self, engine="torch")

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def inference_engine(cfg: dict[str, Any], device: torch.device | str) -> str:
    """What runs a run's forward passes after training: its `inference_engine` on a CPU (ONNX
    Runtime, cnnkit.onnx_forward, compiled frozen weights, cnnkit.compiled_forward, and those in int8,
    cnnkit.int8_forward, are the CPU's), always torch on a GPU."""
    return "torch" if torch.device(device).type != "cpu" else cfg.get("inference_engine", "torch")


def forward(fn: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess, x: torch.Tensor,
            device: torch.device, precision: str, channels_last: bool) -> torch.Tensor:
    """Float images in [0, 1] (after augmentation or a test view) -> `fn` of the model's input:
    the rest of the preprocessing, the memory format and autocast. The training step uses it too."""
    x = preprocess.finish(x)
    if channels_last:  # 1.7x faster on the 2-core CPU (benchmarks/RESULTS.md, transfer-speed)
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        return fn(x)


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
    tta_below: float | None = None,
    outputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    description: str | None = None,
    engine: str = "torch",
) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images (N, C, H, W), in batches; with test-time
    augmentation (`flip`, `shift`, `flip-shift`) averaged over the views, and with `tta_below`
    only for the images whose top probability from the image itself is below it (the others keep
    their one view's logits). `outputs` replaces the model's forward (the probe takes pooled
    features: a module, for `engine`); `description` shows a progress bar. `channels_last` puts the
    inputs, and the model in place, in channels-last memory format. `engine="onnxruntime"` runs the
    forward passes on the CPU under ONNX Runtime, in fp32 (cnnkit.onnx_forward); `engine="compile"`
    compiled by torch.compile with frozen weights (cnnkit.compiled_forward); `engine="int8"` the same
    in int8, calibrated on the first batch (cnnkit.int8_forward). PyTorch's own forward passes run
    with each BatchNorm folded into its convolution (cnnkit.fold_batchnorm; the same up to rounding) and, on
    the CPU in fp32, each ReLU6 after it fused into it (cnnkit.conv_activation)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    fn: Callable[[torch.Tensor], torch.Tensor] = outputs or model
    cpu_engine = engine != "torch" and device.type == "cpu" and isinstance(fn, nn.Module)
    if cpu_engine and engine == "onnxruntime":  # fp32, on contiguous inputs
        precision, channels_last = "fp32", False
    if cpu_engine and engine == "int8":  # its own precision: no autocast around it
        precision = "fp32"
    if channels_last:  # before a compile: the frozen weights keep the layout they had
        model.to(memory_format=torch.channels_last)
    if cpu_engine:
        fn = _cpu_engine_forward(fn.eval(), engine)
    elif isinstance(fn, nn.Module) and fold_batchnorm.enabled():  # PyTorch's folded copy: Lite0-2 1.1x, fused 1.2x more
        fn = fold_batchnorm.folded_forward(fn)
    images = torch.as_tensor(images)
    starts = range(0, len(images), batch_size)
    out = []
    for start in track(starts, description) if description else starts:
        views = tta_views(preprocess.to_float(images[start : start + batch_size].to(device)), tta)
        logits = forward(fn, preprocess, views[0], device, precision, channels_last).float()
        if len(views) > 1:
            unsure = (slice(None) if tta_below is None
                      else torch.nonzero(logits.softmax(1).amax(1) < tta_below).flatten())
            total = logits[unsure]
            if len(total):  # a batch of sure images needs no more views
                for view in views[1:]:
                    total = total + forward(fn, preprocess, view[unsure], device, precision, channels_last).float()
                logits[unsure] = total / len(views)
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _cpu_engine_forward(module: nn.Module, engine: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module`'s forward under the CPU's engine for fixed weights, imported only when a run asks
    for it: ONNX Runtime (cnnkit.onnx_forward), torch.compile with frozen weights
    (cnnkit.compiled_forward), or that in int8 (cnnkit.int8_forward)."""
    if engine == "onnxruntime":
        from cnnkit.onnx_forward import onnx_forward

        return onnx_forward(module)
    if engine == "int8":
        from cnnkit.int8_forward import int8_forward

        return int8_forward(module)
    from cnnkit.compiled_forward import compiled_forward

    return compiled_forward(module)
