"""BatchNorm folded into convolutions for forward passes with fixed weights (cnnkit.fold_batchnorm):
the same outputs, only the pairs that are really conv -> BatchNorm, and never a stale copy."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from cnnkit.fold_batchnorm import fold
from cnnkit.inference import predict_logits
from cnnkit.preprocess import Preprocess


def _random_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm layers that do something (a new one is the identity in eval mode)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _small() -> nn.Module:
    return _random_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                            nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))


PRE = Preprocess(data_size=12, data_channels=3, input_size=12, model_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
IMAGES = np.random.default_rng(0).integers(0, 256, (20, 3, 12, 12), dtype=np.uint8)


def _plain(model: nn.Module, images: np.ndarray = IMAGES) -> torch.Tensor:
    """The model's own outputs, in predict_logits' batches of 8 (a kernel may round by batch size)."""
    was_training = model.training
    with torch.no_grad():
        out = torch.cat([model.eval()(PRE.finish(PRE.to_float(torch.as_tensor(images[i:i + 8]))))
                         for i in range(0, len(images), 8)])
    model.train(was_training)
    return out


def test_every_batchnorm_of_a_timm_efficientnet_lite_folds_and_the_outputs_agree():
    model = _random_statistics(timm.create_model("tf_efficientnet_lite0", num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    folded = fold(model, x[:1])
    assert folded is not None and _batchnorms(folded) == 0  # BatchNormAct2d's too, its activation kept
    assert _batchnorms(model) == 49  # the model itself is left as it was
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


class Residual(nn.Module):
    """The convolution's output is used twice: normalized, and as it is. Folding would change the second."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Shifted(nn.BatchNorm2d):
    """A BatchNorm2d subclass that does more than normalize."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


@pytest.mark.parametrize("model", [
    Residual(),
    nn.Sequential(nn.Conv2d(3, 3, 3), nn.MaxPool2d(2), nn.BatchNorm2d(3)),  # a pool between them
    nn.Sequential(nn.Conv2d(3, 3, 3), Shifted(3)),
], ids=["conv-output-used-twice", "batchnorm-after-a-pool", "unknown-subclass"])
def test_what_is_not_a_conv_then_batchnorm_pair_is_left_alone(model):
    model = _random_statistics(model)
    assert fold(model, torch.randn(1, 3, 12, 12)) is None
    got = predict_logits(model, PRE, IMAGES, batch_size=8)  # and predictions are the model's own
    torch.testing.assert_close(got, _plain(model), rtol=0, atol=0)


def test_predictions_follow_weights_changed_in_place():
    """The folded copy is kept between calls (a report evaluates one model 22 times), so it must be
    made again whenever the weights change: an optimizer step, load_state_dict, running statistics."""
    model = _small()
    torch.testing.assert_close(predict_logits(model, PRE, IMAGES, batch_size=8), _plain(model), rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(torch.randn(4, 3, 12, 12)).sum().backward()  # a training step: running statistics and weights change
    opt.step()
    stepped = _plain(model)
    got = predict_logits(model, PRE, IMAGES, batch_size=8)
    assert not torch.allclose(got, torch.zeros_like(got)) and model.training  # its mode given back
    torch.testing.assert_close(got, stepped, rtol=1e-4, atol=1e-5)
    model.load_state_dict(_small().state_dict())
    torch.testing.assert_close(predict_logits(model, PRE, IMAGES, batch_size=8), _plain(model), rtol=1e-4, atol=1e-5)
    model[1].running_mean.add_(1.0)
    torch.testing.assert_close(predict_logits(model, PRE, IMAGES, batch_size=8), _plain(model), rtol=1e-4, atol=1e-5)


def test_folded_predictions_are_not_the_plain_ones_bit_for_bit_and_the_switch_turns_it_off(monkeypatch):
    """Folding is at work in predict_logits (rounding differs), and CNNKIT_FOLD_BATCHNORM=0 gives the model's own."""
    model = _small()
    folded = predict_logits(model, PRE, IMAGES, batch_size=8)
    assert not torch.equal(folded, _plain(model))
    monkeypatch.setenv("CNNKIT_FOLD_BATCHNORM", "0")
    torch.testing.assert_close(predict_logits(model, PRE, IMAGES, batch_size=8), _plain(model), rtol=0, atol=0)


def test_a_model_with_nothing_to_fold_is_not_kept_alive():
    """The copies are kept per model while it lives: one whose copy would be itself is let go with it."""
    import gc
    import weakref

    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    predict_logits(model, PRE, IMAGES, batch_size=8)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_wrappers_of_one_model_share_its_folded_copy(monkeypatch):
    """A budgeted probe's features come chunk by chunk, each through a new PooledFeatures of the same model:
    one fold for all (it deep-copies the model), not one a chunk; another model of the same type gets its own."""
    from cnnkit import fold_batchnorm

    class Pooled(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model[:6](x).mean((2, 3))

    calls = []
    real = fold_batchnorm.fold
    monkeypatch.setattr(fold_batchnorm, "fold", lambda m, x: calls.append(m) or real(m, x))
    model, other = _small(), _small()
    for _ in range(3):
        got = predict_logits(model, PRE, IMAGES, batch_size=8, outputs=Pooled(model))
    assert len(calls) == 1 and got.shape == (20, 8)
    predict_logits(other, PRE, IMAGES, batch_size=8, outputs=Pooled(other))
    assert len(calls) == 2
