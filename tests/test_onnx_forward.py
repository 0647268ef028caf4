"""ONNX Runtime as the CPU's inference engine (cnnkit.onnx_forward): the same numbers as torch,
a new export when the weights change, torch when a module does not export, and which runs use it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.inference import InferenceSettings, inference_engine, predict_logits
from cnnkit.models.fastnet import FastNet
from cnnkit.onnx_forward import weights_digest
from cnnkit.preprocess import make_preprocess
from cnnkit.probe import PooledFeatures


def _images(n: int, channels: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def test_a_backbone_gives_torch_logits_and_features():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4).eval()
    images = _images(37, 3, 64)  # a last batch shorter than the others: the batch axis is dynamic
    pre = make_preprocess(Config(dataset="folder", model="tf_efficientnet_lite0", image_size=64), images)
    want = predict_logits(model, pre, images, batch_size=16, tta="flip")
    got = predict_logits(model, pre, images, batch_size=16, tta="flip", engine="onnxruntime")
    assert got.shape == want.shape == (37, 4) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-4)
    pooled = PooledFeatures(model)
    want = predict_logits(model, pre, images[:8], outputs=pooled)
    got = predict_logits(model, pre, images[:8], outputs=pooled, engine="onnxruntime")
    assert got.shape == (8, 1280) and torch.allclose(got, want, atol=1e-3, rtol=1e-4)


def test_changed_weights_export_again():
    model = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = _images(20, 1, 28)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    before = predict_logits(model, pre, images, engine="onnxruntime")
    digest = weights_digest(model)
    with torch.no_grad():
        model.head.weight.mul_(-2)  # a fitted head, a loaded checkpoint: the same module, new weights
    assert weights_digest(model) != digest
    after = predict_logits(model, pre, images, engine="onnxruntime")
    assert torch.allclose(after, -2 * before, atol=1e-4)
    assert torch.allclose(after, predict_logits(model, pre, images), atol=1e-4)


class _NoExport(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # through numpy: the tracer records a constant
        return torch.from_numpy(x.flatten(1)[:, :3].numpy() * 2)


def test_a_module_that_does_not_export_runs_in_torch(caplog):
    images = _images(5, 1, 8)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    with caplog.at_level(logging.WARNING):
        out = predict_logits(_NoExport(), pre, images, engine="onnxruntime")
    assert torch.allclose(out, predict_logits(_NoExport(), pre, images))
    assert "_NoExport did not export" in caplog.text and "runs in torch" in caplog.text


@pytest.mark.parametrize("asked, device, want", [
    (None, "cpu", "torch"),  # the default
    ("onnxruntime", "cpu", "onnxruntime"),
    ("torch", "cpu", "torch"),
    ("onnxruntime", "cuda", "torch"),  # the engine is the CPU's
])
def test_which_runs_use_onnxruntime(asked, device, want):
    cfg = {"strategy": "linear-probe", "precision": "bf16", **({"inference_engine": asked} if asked else {})}
    assert inference_engine(cfg, torch.device(device)) == want
    if device == "cpu":
        settings = InferenceSettings.for_run(cfg, device)
        assert settings.engine == want and settings.precision == "bf16"  # the run's; ONNX Runtime runs fp32 anyway
        assert settings.in_torch().engine == "torch"  # validation: weights that change every epoch


def test_bad_engine_is_refused():
    from cnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match="inference_engine"):
        Config(inference_engine="tensorrt").validate()
