"""BatchNorm folded into the convolution before it, for forward passes with fixed weights.

In eval mode a BatchNorm layer is a per-channel scale and shift, which can be merged into the
weights and bias of the convolution that feeds it: one layer's work instead of two, the same
function up to float rounding. PyTorch's eager mode does not do this by itself (torch.compile with
frozen weights and ONNX Runtime do, at a cost: seconds of compiling, an export). On the 2-core Zen 3
it made EfficientNet-Lite0/1/2's features 1.08-1.12x faster in PyTorch's own kernels, and the photo
default's whole run on flowers12 took 0.89 of the time (2.12 against 2.37 minutes, the same choices
and accuracy: `fold-batchnorm`, `zen3-fp32-photos-fold-batchnorm` in benchmarks/RESULTS.md), since
forward passes with fixed weights are most of a photo run: choosing its backbone, its test, its report.

PyTorch gives the arithmetic (`torch.nn.utils.fusion.fuse_conv_bn_eval`), but not the pairs for
these models: `torch.fx`'s fuser cannot trace timm's TensorFlow-style "same" padding (computed from
the input's shape in Python) and does not see timm's BatchNormAct2d (BatchNorm, then its activation)
as a BatchNorm. So the pairs are found by watching one image go through: a BatchNorm whose input is
the very tensor a convolution returned, each called once. The folded copy is checked against the
model on that image and used only if it agrees; the model itself is never changed.

`CNNKIT_FOLD_BATCHNORM=0` switches it off (to measure what it does, or to rule it out).
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cnnkit import conv_activation
from cnnkit.models import same_padding

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # of the output's largest magnitude; folding differs by rounding alone (about 1e-6)

# The latest folded copies, each while its module's weights stay what they were: the report evaluates one
# model 22 times, a server on every request, a budgeted probe in chunks (each through a new PooledFeatures
# wrapper of the same model: the key is the module's type and its weight tensors, not the wrapper object). Kept
# by weak references to those tensors, so a model is let go when its user lets it go.
CACHE_SIZE = 4
_Entry = tuple[tuple[weakref.ref, ...], tuple[tuple[int, int], ...], "nn.Module | None"]
_folded: OrderedDict[tuple[type, tuple[int, ...], bool, bool], _Entry] = OrderedDict()


def enabled() -> bool:
    """Whether forward passes with fixed weights fold BatchNorm (CNNKIT_FOLD_BATCHNORM=0: not)."""
    return os.environ.get("CNNKIT_FOLD_BATCHNORM", "1") != "0"


def folded_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module`'s forward in eval mode with its BatchNorm layers folded into their convolutions,
    the copy made at the first batch (the pairs are found on its first image). A module with no
    such pair, or whose copy does not agree with it, runs as it is."""
    state: dict[str, nn.Module] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if "fn" not in state:
            state["fn"] = _folded_copy(module, x[:1])
        return state["fn"](x)

    return forward


def _folded_copy(module: nn.Module, example: torch.Tensor) -> nn.Module:
    tensors = (*module.parameters(), *module.buffers())
    key = (type(module), tuple(id(t) for t in tensors), same_padding.enabled(), conv_activation.enabled())
    hit, state = _folded.get(key), _weights_state(tensors)
    if hit is None or hit[1] != state or any(r() is not t for r, t in zip(hit[0], tensors)):
        hit = tuple(weakref.ref(t) for t in tensors), state, fold(module, example)
    _folded[key] = hit
    _folded.move_to_end(key)
    while len(_folded) > CACHE_SIZE:
        _folded.popitem(last=False)
    return hit[2] or module


def _weights_state(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], ...]:
    """Where each weight lives and how often it was changed in place (an optimizer step, a
    load_state_dict, a change of memory format all change one or the other): the copy is made again then."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def fold(module: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """A copy of `module` (in eval mode) with each BatchNorm that follows a convolution folded into
    it and TensorFlow's padding in the kernel, checked on `example` (one input); None where nothing
    folds or the copy disagrees."""
    module.eval()
    with torch.no_grad(), torch.autocast(example.device.type, enabled=False):
        example = example.float()
        pairs, want = _pairs(module, example)
        if not pairs:
            return None
        names = {m: name for name, m in module.named_modules(remove_duplicate=False)}
        folded = copy.deepcopy(module)
        for conv, bn in pairs:
            folded.set_submodule(names[conv], fuse_conv_bn_eval(folded.get_submodule(names[conv]),
                                                                 folded.get_submodule(names[bn])))
            folded.set_submodule(names[bn], _after_normalizing(folded.get_submodule(names[bn])))
        if same_padding.enabled():
            same_padding.use_same_conv(folded)
        if conv_activation.enabled():
            conv_activation.fuse(folded, [(names[conv], names[bn]) for conv, bn in pairs])
        got = folded(example)
    if not isinstance(want, torch.Tensor) or (got - want).abs().max() > TOLERANCE * want.abs().max().clamp_min(1):
        log.debug("BatchNorm not folded in %s: the folded copy disagrees", type(module).__name__)
        return None
    log.debug("%d BatchNorm layers folded into their convolutions in %s", len(pairs), type(module).__name__)
    return folded


def _pairs(module: nn.Module, example: torch.Tensor) -> tuple[list[tuple[nn.Module, nn.Module]], object]:
    """(convolution, BatchNorm) pairs where the BatchNorm's input is the tensor the convolution
    returned and each ran once on `example`; and `module`'s output."""
    made: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id of a convolution's output -> it and that output
    calls: dict[nn.Module, int] = {}
    fed: dict[nn.Module, nn.Module] = {}  # BatchNorm -> the convolution that fed it

    def after_conv(conv: nn.Module, _: object, out: object) -> None:
        calls[conv] = calls.get(conv, 0) + 1
        if isinstance(out, torch.Tensor):
            made[id(out)] = conv, out  # the output kept alive: no later tensor takes its id

    def before_bn(bn: nn.Module, args: tuple) -> None:
        calls[bn] = calls.get(bn, 0) + 1
        source = made.get(id(args[0])) if args else None
        if source is not None and source[1] is args[0]:
            fed[bn] = source[0]

    hooks = [m.register_forward_hook(after_conv) for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in module.modules() if _foldable(m)]
    try:
        out = module(example)
    finally:
        for h in hooks:
            h.remove()
    pairs = [(conv, bn) for bn, conv in fed.items() if calls[bn] == 1 and calls[conv] == 1]
    return pairs, out


def _foldable(m: nn.Module) -> bool:
    """A BatchNorm2d using its running statistics, plain or timm's BatchNormAct2d (then its
    dropout and activation, kept after folding); another subclass may do more than normalize."""
    if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None or m.running_var is None:
        return False
    return type(m) is nn.BatchNorm2d or (type(m).__name__ == "BatchNormAct2d" and hasattr(m, "act")
                                        and hasattr(m, "drop"))


def _after_normalizing(bn: nn.Module) -> nn.Module:
    """What is left of a folded BatchNorm: nothing, or BatchNormAct2d's dropout and activation."""
    return nn.Identity() if type(bn) is nn.BatchNorm2d else nn.Sequential(bn.drop, bn.act)
