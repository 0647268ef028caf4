"""A convolution and the ReLU6 (or another activation) after it as one oneDNN call, for fixed weights.

In eager PyTorch a convolution writes its whole output to memory and the activation then reads and
writes all of it again: on a 2-core CPU, whose few cores wait on memory for large activations, the
ReLU6 layers (`hardtanh_`) took 9.7 of the 87 s of forward passes in a profile of the photo default
on flowers12. oneDNN can clamp each value as the convolution writes it (a "post-op"); PyTorch exposes
that as `torch.ops.mkldnn._convolution_pointwise`, which torch.compile's CPU code calls for the same
fusion. Called here without compiling (10-30 s a model, not worth it for a few hundred photos).

Used only where it is the same function: float32 on the CPU, no gradient, no autocast; anything else
(a GPU, bf16 autocast, Grad-CAM's backward pass) takes the convolution and the activation one after the
other as before. cnnkit.fold_batchnorm applies it to the copies it makes after folding each BatchNorm
(timm's BatchNormAct2d leaves its activation behind the folded convolution) and checks the copy against
the model on an image; the op is first checked on a small convolution (`enabled`), and a layer whose
call it refuses (a shape or layout this PyTorch's op does not take) goes back to the two steps for good.
`CNNKIT_FUSE_ACTIVATION=0` switches it off (to measure what it does, or to rule it out).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from cnnkit.models.same_padding import SameConv2d

log = logging.getLogger(__name__)

# oneDNN's names of the activations fused, and their arguments (EfficientNet-Lite's ReLU6; others' SiLU,
# Hardswish, GELU: the same function to float rounding in our checks)
POST_OPS: dict[type[nn.Module], tuple[str, list[float]]] = {
    nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", []), nn.SiLU: ("swish", []), nn.Hardswish: ("hardswish", []),
    nn.GELU: ("gelu", []),
}


def enabled() -> bool:
    """Whether fixed-weight copies fuse activations into their convolutions (CNNKIT_FUSE_ACTIVATION=0: not;
    nor where this PyTorch's op is missing or computes something else)."""
    return os.environ.get("CNNKIT_FUSE_ACTIVATION", "1") != "0" and _op_works()


@functools.cache
def _op_works() -> bool:
    """The fused op on a small convolution gives what the convolution and ReLU6 give (a private op: checked once)."""
    g = torch.Generator().manual_seed(0)
    conv, x = nn.Conv2d(4, 4, 3, padding=1), torch.randn(2, 4, 5, 5, generator=g) * 8
    try:
        with torch.no_grad():
            got = ConvActivation(conv, nn.ReLU6())(x)
            return bool(torch.allclose(got, nn.functional.relu6(conv(x)), atol=1e-5))
    except (RuntimeError, AttributeError, TypeError):
        return False


class ConvActivation(nn.Module):
    """`conv` then `activation` (one of POST_OPS), fused where the inputs allow (see the module)."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module):
        super().__init__()
        self.conv, self.activation = conv, activation
        self.post_op, self.scalars = POST_OPS[type(activation)]
        self.algorithm = getattr(activation, "approximate", "")  # GELU's: "none" or "tanh"
        self.refused = False  # the op raised once: two steps from then on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (self.refused or x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return self.activation(conv(x))
        inputs, weight, padding = conv_arguments(conv, x)
        try:
            return torch.ops.mkldnn._convolution_pointwise(inputs, weight, conv.bias, list(padding), list(conv.stride),
                                                           list(conv.dilation), conv.groups, self.post_op,
                                                           self.scalars, self.algorithm)
        except RuntimeError as e:
            log.debug("convolution and %s not fused: %s", type(self.activation).__name__, e)
            self.refused = True
            return self.activation(conv(x))


def conv_arguments(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The input, weight and symmetric padding `conv` convolves with (models.same_padding's own, computed
    for each input's size)."""
    arguments = getattr(conv, "arguments", None)
    return arguments(x) if arguments is not None else (x, conv.weight, tuple(conv.padding))


def fuse(model: nn.Module, pairs: list[tuple[str, str]]) -> int:
    """For each (convolution, what follows it) in `model` by name where what follows is an activation of
    POST_OPS alone (or after an Identity: a folded BatchNormAct2d's dropout), the convolution becomes a
    ConvActivation and what followed an Identity (in place); return how many. Only a Conv2d itself or a
    SameConv2d: a subclass may convolve otherwise (timm's Conv2dSame pads its input first)."""
    fused = 0
    for conv_name, after_name in pairs:
        conv, after = model.get_submodule(conv_name), model.get_submodule(after_name)
        parts = [m for m in (after if isinstance(after, nn.Sequential) else [after]) if not isinstance(m, nn.Identity)]
        if (len(parts) != 1 or type(parts[0]) not in POST_OPS or type(conv) not in (nn.Conv2d, SameConv2d)
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):  # timm's Conv2dSame pads the input
            continue
        model.set_submodule(conv_name, ConvActivation(conv, parts[0]))
        model.set_submodule(after_name, nn.Identity())
        fused += 1
    return fused
