"""torch.compile with frozen weights as the CPU's inference engine (cnnkit.compiled_forward): the
same numbers as eager torch, one compile for a run's batches (shorter ones padded or run eagerly),
a new compile when the weights change, and eager torch when a module does not compile."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from cnnkit import compiled_forward as cf
from cnnkit.config import Config
from cnnkit.inference import InferenceSettings, predict_logits
from cnnkit.models.fastnet import FastNet
from cnnkit.preprocess import make_preprocess

pytestmark = pytest.mark.filterwarnings("ignore")
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                                    reason="torch.compile needs a C++ compiler: apt-get install g++")


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(autouse=True)
def nothing_kept():
    """Each test starts with no compiled module kept (a failed one would run the next eagerly)."""
    cf._KEPT.clear()
    yield
    cf._KEPT.clear()


@pytest.fixture
def counted_compiles(monkeypatch):
    """torch.compile as it is, counting the graphs Inductor builds (one per input shape)."""
    counts = {"graphs": 0}
    real = torch.compile

    def counting(module, **kwargs):
        def backend(gm, inputs):
            counts["graphs"] += 1
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, inputs)

        return real(module, backend=backend, **kwargs)

    monkeypatch.setattr(cf.torch, "compile", counting)
    return counts


@needs_compiler
def test_compiled_logits_are_torch_logits_with_one_compile(counted_compiles):
    model = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = _images(45)  # batches of 16, 16 and 13 (padded to 16)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    want = predict_logits(model, pre, images, batch_size=16, channels_last=True)
    got = predict_logits(model, pre, images, batch_size=16, channels_last=True, engine="compile")
    assert got.shape == want.shape == (45, 10) and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert counted_compiles["graphs"] == 1
    # a batch under half the first one's size runs eagerly; test views of some images compile nothing new
    few = predict_logits(model, pre, images[:5], batch_size=16, channels_last=True, engine="compile")
    assert torch.allclose(few, want[:5], atol=1e-4, rtol=1e-4)
    flips = predict_logits(model, pre, images, batch_size=16, channels_last=True, engine="compile", tta="flip",
                           tta_below=0.5)
    assert torch.allclose(flips, predict_logits(model, pre, images, batch_size=16, channels_last=True, tta="flip",
                                                tta_below=0.5), atol=1e-4, rtol=1e-4)
    assert counted_compiles["graphs"] == 1


@needs_compiler
def test_changed_weights_compile_again(counted_compiles):
    model = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = _images(16)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    before = predict_logits(model, pre, images, engine="compile")
    with torch.no_grad():
        model.head.weight.mul_(-2)  # a fitted head: the same module, new weights (frozen into the code)
    after = predict_logits(model, pre, images, engine="compile")
    assert torch.allclose(after, predict_logits(model, pre, images), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after, before, atol=1e-2)
    assert counted_compiles["graphs"] == 2


class _Wrapped(torch.nn.Module):
    """A wrapper made anew around a model for each call, as probe.PooledFeatures is."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 2


@needs_compiler
def test_a_new_wrapper_around_the_same_model_reuses_its_compile(counted_compiles):
    model = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = _images(32)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    chunks = [predict_logits(model, pre, images[i: i + 16], batch_size=16, outputs=_Wrapped(model).eval(),
                             engine="compile") for i in (0, 16)]  # a budgeted probe's chunks
    assert torch.allclose(torch.cat(chunks), 2 * predict_logits(model, pre, images), atol=1e-4, rtol=1e-4)
    assert counted_compiles["graphs"] == 1
    other = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    other.load_state_dict(model.state_dict())  # equal weights, another model: compiled for itself
    predict_logits(other, pre, images[:16], batch_size=16, outputs=_Wrapped(other).eval(), engine="compile")
    assert counted_compiles["graphs"] == 2


@needs_compiler
def test_a_function_made_for_one_module_keeps_running_it_after_another_compiles():
    first, second = (FastNet(10, 1, 28, widths=(8, 16, 16)).eval() for _ in range(2))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        second.head.weight.mul_(-100)  # logits far from the first's (a new net's are all near zero)
        run_first = cf.compiled_forward(first)
        run_first(x)
        cf.compiled_forward(second)(x)  # the one kept compile is now the second's
        assert torch.allclose(run_first(x), first(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(first(x), second(x), atol=1e-2)


def test_a_module_that_does_not_compile_runs_eagerly(monkeypatch, caplog):
    def broken(module, **kwargs):
        def fn(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fn

    monkeypatch.setattr(cf.torch, "compile", broken)
    model = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = _images(20)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    with caplog.at_level(logging.WARNING):
        out = predict_logits(model, pre, images, batch_size=8, engine="compile")
    assert torch.allclose(out, predict_logits(model, pre, images, batch_size=8))
    assert caplog.text.count("did not compile") == 1 and "No working C++ compiler" in caplog.text


def test_a_run_asks_for_it_on_the_cpu_only():
    cfg = Config(inference_engine="compile")
    cfg.validate()
    assert InferenceSettings.for_run(cfg.to_dict(), "cpu").engine == "compile"
    assert InferenceSettings.for_run(cfg.to_dict(), "cuda").engine == "torch"


@needs_compiler
def test_a_module_with_the_same_weights_does_not_reuse_another_modules_compile():
    """`cnnkit evaluate` in the process that trained: the loaded model has the trained one's weights,
    but the trained one is back in training mode (BatchNorm on batch statistics) and is not it."""
    import copy

    trained = FastNet(10, 1, 28, widths=(8, 16, 16)).eval()
    images = _images(16)
    pre = make_preprocess(Config(dataset="fashion-mnist", model="fastnet"), images)
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    loaded = copy.deepcopy(trained)
    predict_logits(trained, pre, images, engine="compile")
    trained.train()
    got = predict_logits(loaded, pre, images, engine="compile")
    assert torch.allclose(got, predict_logits(loaded, pre, images), atol=1e-4, rtol=1e-4)
