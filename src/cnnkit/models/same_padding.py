"""TensorFlow's "same" padding without copying the input: the kernel is padded instead.

EfficientNet-Lite's weights come from TensorFlow, whose stride-2 convolutions pad an input of even size
by one row and column more after it than before (3x3: none before, one after). PyTorch's convolution
pads symmetrically only, so timm's Conv2dSame first copies the whole input into a padded tensor
(`F.pad`), then convolves without padding. On a 2-core CPU those copies were 9% of a forward pass of
EfficientNet-Lite0-2 (`torch.nn.functional.pad`, 4.1 of 47 s in a profile of a photo run's report).

The same function without the copy: a kernel one larger, its first row (and column) zero, with
symmetric padding of half the total rounded up. Output j then reads the input rows from
s*j - (p+1)//2 + 1, which is TensorFlow's s*j - p//2 for an odd total p, and as many rows come out.
Where the total is even it is plain symmetric padding. The padded kernel is a few kilobytes, made on
each call from the convolution's own weight. The sums are the same products (the extra ones are
zeros): identical outputs on the CPU in our checks, gradients equal to rounding.

Where it is used: the copies that run forward passes with fixed weights (cnnkit.fold_batchnorm: a
probe's features, the test, the report, `cnnkit evaluate`, predict, the server). A model itself keeps
timm's Conv2dSame, so checkpoints, training, ONNX export and the compiled and int8 engines see timm's
layers as before: torchao's int8 quantizer needs a convolution's weight to be a parameter, not the
output of a pad ("Expected get_attr node"). `CNNKIT_SAME_CONV=0` keeps timm's padding in the copies
too (to measure what this does, or to rule it out).

Measured (a 2-core AMD Zen 3, fp32, channels-last, BatchNorm folded, glibc's malloc tuned as cnnkit
runs, batch 64, ImageNet weights; `benchmarks/onnx_features.py --timm-padding`, `same-padding` in
benchmarks/RESULTS.md): 1.03-1.14x the images per second of timm's padding for Lite0 at 224 px,
Lite1 at 240 and Lite2 at 260 (without the malloc tuning, where each padded copy is a fresh
allocation, 1.15-1.27x); the photo default's whole run on flowers12 0.98 of the time, within the
run-to-run spread (`zen3-fp32-photos-same-padding`). A fine-tuning step gained nothing, another
reason the trained model keeps timm's layers.

On a GPU (not measured here) a 4x4 or 6x6 depthwise kernel may lose cuDNN's fast 3x3/5x5 paths, so
there the odd case pads the input as timm does. Written here because timm offers TensorFlow padding
only as that copy (`Conv2dSame`; `pad_type=''` is symmetric and so not the weights' function).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def enabled() -> bool:
    """Whether fixed-weight copies pad in the kernel (CNNKIT_SAME_CONV=0: not)."""
    return os.environ.get("CNNKIT_SAME_CONV", "1") != "0"


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """TensorFlow's total "same" padding along one dimension (the smaller half goes before)."""
    return max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class SameConv2d(nn.Conv2d):
    """A Conv2d with TensorFlow's "same" padding, computed for each input's size (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, padding = self.arguments(x)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def arguments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The input, weight and symmetric padding that give TensorFlow's padding of `x` (cnnkit.conv_activation
        convolves with them too)."""
        pads = [same_padding(n, k, s, d) for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride,
                                                               self.dilation)]
        odd = [p % 2 for p in pads]
        if any(odd) and (x.device.type != "cpu" or self.dilation != (1, 1)):  # timm's way: pad the input
            return F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2)), self.weight, (0, 0)
        weight = F.pad(self.weight, (odd[1], 0, odd[0], 0)) if any(odd) else self.weight
        return x, weight, ((pads[0] + 1) // 2, (pads[1] + 1) // 2)


def use_same_conv(model: nn.Module) -> int:
    """Replace each of timm's Conv2dSame in `model` by a SameConv2d holding the same parameters
    (in place); return how many. Models without TensorFlow padding are left as they are."""
    from timm.layers.conv2d_same import Conv2dSame

    found = [(name, m) for name, m in model.named_modules() if type(m) is Conv2dSame]
    for name, old in found:
        new = SameConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0, old.dilation,
                         old.groups, old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        new.weight, new.bias = old.weight, old.bias
        model.set_submodule(name, new)
    return len(found)
