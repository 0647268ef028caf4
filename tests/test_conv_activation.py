"""A convolution and its ReLU6 as one oneDNN call in fixed-weight copies (cnnkit.conv_activation): the same
outputs, the fused op only where it is the same function, and a switch that turns it off."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cnnkit.conv_activation import ConvActivation, enabled
from cnnkit.fold_batchnorm import fold
from cnnkit.models.same_padding import SameConv2d

pytestmark = pytest.mark.skipif(not enabled(), reason="this PyTorch has no working fused convolution op")


def _lite0() -> nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # BatchNorm that does something, so that some values reach the clamp at 6
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 8 - 2)
    return model


def test_every_relu6_of_efficientnet_lite_is_fused_into_its_convolution_and_the_outputs_agree():
    model = _lite0()
    x = torch.randn(2, 3, 64, 64)
    copy = fold(model, x[:1])
    assert copy is not None
    fused = [m for m in copy.modules() if isinstance(m, ConvActivation)]
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert len(fused) == relu6 == 33 and sum(isinstance(m, nn.ReLU6) for m in copy.modules()) == relu6  # kept inside
    assert sum(isinstance(m.conv, SameConv2d) for m in fused) == 5  # TensorFlow's padding too
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(copy(x.contiguous(memory_format=torch.channels_last)), model(x), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("stride,size", [(1, 9), (2, 10), (2, 9)])  # TensorFlow's odd padding at (2, 10)
def test_the_fused_op_is_the_convolution_then_relu6(stride, size):
    g = torch.Generator().manual_seed(0)
    conv = SameConv2d(4, 6, 3, stride)
    x = torch.randn(3, 4, size, size, generator=g) * 5
    layer = ConvActivation(conv, nn.ReLU6())
    with torch.no_grad():
        want = nn.functional.relu6(conv(x))
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want == 6).any() and (want == 0).any()  # both ends of the clamp were met


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.GELU(), nn.GELU("tanh")],
                         ids=["relu", "silu", "hardswish", "gelu", "gelu-tanh"])
def test_other_activations_fuse_to_the_same_function(activation):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        torch.testing.assert_close(ConvActivation(conv, activation)(x), activation(conv(x)), rtol=1e-5, atol=1e-5)


def test_gradients_autocast_and_other_dtypes_take_the_convolution_then_the_activation(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", lambda *a: calls.append(1) or real(*a))
    layer = ConvActivation(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    layer(x).sum().backward()  # Grad-CAM's backward pass
    assert x.grad is not None and calls == []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 and calls == []
    with torch.no_grad():
        layer.double()(x.double())
        assert calls == []
        layer.float()(x)
    assert calls == [1]


def test_a_call_the_op_refuses_goes_back_to_two_steps_for_good(monkeypatch):
    calls = []

    def refuses(*args):
        calls.append(1)
        raise RuntimeError("not this shape")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuses)
    conv, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 8, 8)
    layer = ConvActivation(conv, nn.ReLU6())
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x), nn.functional.relu6(conv(x)))
    assert calls == [1]


def test_the_switch_keeps_the_activations_as_layers(monkeypatch):
    monkeypatch.setenv("CNNKIT_FUSE_ACTIVATION", "0")
    copy = fold(_lite0(), torch.randn(1, 3, 64, 64))
    assert copy is not None and not any(isinstance(m, ConvActivation) for m in copy.modules())
