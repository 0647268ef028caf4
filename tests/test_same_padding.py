"""TensorFlow's "same" padding in the kernel (cnnkit.models.same_padding): the function of timm's
Conv2dSame for every size, kernel and stride, with the same gradients; used in fixed-weight copies only."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from cnnkit.fold_batchnorm import fold
from cnnkit.models.same_padding import SameConv2d, use_same_conv


def _pair(kernel: int, stride: int, groups: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    old = Conv2dSame(4, 8 if groups == 1 else 4, kernel, stride, groups=groups)
    holder = nn.Sequential(old)
    use_same_conv(holder)
    return old, holder[0]


@pytest.mark.parametrize("kernel,stride,groups", [(3, 2, 1), (3, 2, 4), (5, 2, 4), (3, 1, 1), (4, 2, 1), (5, 3, 4)])
@pytest.mark.parametrize("size", [(16, 16), (17, 17), (16, 11), (9, 24)])
def test_outputs_and_gradients_are_timms(kernel, stride, groups, size):
    old, new = _pair(kernel, stride, groups)
    assert type(new) is SameConv2d and new.weight is old.weight  # the same parameters, not copies
    x = torch.randn(2, 4, *size, requires_grad=True)
    want = old(x)
    (want ** 2).sum().backward()
    grads = x.grad.clone(), old.weight.grad.clone()
    x.grad = None
    old.weight.grad = None
    got = new(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (got ** 2).sum().backward()
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new.weight.grad, grads[1], rtol=1e-4, atol=1e-4)


def test_channels_last_inputs_give_the_same_outputs():
    old, new = _pair(5, 2, 4)
    x = torch.randn(2, 4, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)


def test_the_fixed_weight_copy_pads_in_the_kernel_and_the_model_keeps_timms_layers(monkeypatch):
    """The folded copy of EfficientNet-Lite0 has no Conv2dSame left and agrees with the model; the model (what is
    trained, saved, exported and quantized) keeps timm's; CNNKIT_SAME_CONV=0 keeps timm's in the copy too."""
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    copy = fold(model, x[:1])
    assert copy is not None
    kinds = [type(m) for m in copy.modules()]
    assert Conv2dSame not in kinds and kinds.count(SameConv2d) == 5  # the stem and four stride-2 blocks
    assert sum(type(m) is Conv2dSame for m in model.modules()) == 5
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("CNNKIT_SAME_CONV", "0")
    kept = fold(model, x[:1])
    assert sum(type(m) is Conv2dSame for m in kept.modules()) == 5
