"""Pretrained backbones side by side: each sees the image at its own input size, their pooled
features are concatenated and one linear head classifies them. A linear probe's candidate
(`probe_concat`), chosen by cross-validation where the folds prefer it: on a synthetic cat-dog folder
it won on two seeds of three and raised the test accuracy from 83.8% to 85.5%; on flowers12 the folds
preferred EfficientNet-Lite0 and Lite2 together (98.9-99.2% against 98.3-98.6% for Lite2 alone) but
the test stayed where it was (benchmarks/RESULTS.md, `zen4-fp32-photos-concat`). The model's name joins its members' with "+"
("tf_efficientnet_lite0+tf_efficientnet_lite2"); `member_sizes` (a model argument) holds the size
each member sees, so that a checkpoint rebuilds the model exactly.

Written here because timm has no module for it: a member is a timm model without its classifier,
whose output is its pooled features; the wrapper has the few methods of timm's interface that
cnnkit calls (models.features_head).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.models.block_pooled import ARG as POOLED_BLOCKS
from cnnkit.models.block_pooled import BlockPooled
from cnnkit.models.features_head import FeaturesHead

SEPARATOR = "+"
SOURCES_SEPARATOR = " + "  # where each member's weights came from, in one string (load_pretrained's answer)


def member_names(name: str) -> list[str]:
    """The backbones of a concatenated model's name (one name: itself)."""
    return name.split(SEPARATOR)


def layer_label(layer: str, model: str) -> str:
    """A layer's name as a person reads it: 'members.1.blocks.2' of backbones side by side is
    'tf_efficientnet_lite2: blocks.2'; any other layer's name as it is."""
    index, _, rest = layer.removeprefix("members.").partition(".")
    if not is_concat(model) or not layer.startswith("members.") or not index.isdigit():
        return layer
    return f"{member_names(model)[int(index)]}: {rest}"


def is_concat(name: str) -> bool:
    return SEPARATOR in name


class ConcatBackbones(FeaturesHead):
    def __init__(self, members: list[nn.Module], member_sizes: list[int], num_classes: int,
                 interpolation: str = "bicubic"):
        super().__init__()
        if len(members) != len(member_sizes):
            raise ValueError(f"{len(members)} backbones but {len(member_sizes)} member_sizes")
        self.members = nn.ModuleList(members)
        self.member_sizes, self.interpolation = list(member_sizes), interpolation
        self.num_features = sum(int(m.num_features) for m in members)
        self.set_head(num_classes)

    def member_input(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """The (normalised) input at a member's size, resized as `Preprocess.finish` resizes: the
        resampling is linear, so resizing before or after the normalisation gives the same image."""
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        return F.interpolate(x, size=(size, size), mode=self.interpolation, align_corners=False,
                             antialias=self.interpolation in ("bilinear", "bicubic"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(self.member_input(x, s)) for m, s in zip(self.members, self.member_sizes)], 1)


def create_concat(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> ConcatBackbones:
    """Random members (timm models without classifiers) of the name, at `member_sizes` (default:
    each one's pretrained input size)."""
    import timm

    from cnnkit.models.pretrained import input_size, preprocessing

    names = member_names(name)
    sizes = kwargs.pop("member_sizes", None) or [input_size(n) for n in names]
    blocks = kwargs.pop(POOLED_BLOCKS, None)  # each member's features with its last blocks' (models.block_pooled)
    interpolation = str(preprocessing(names[0])["interpolation"])
    members = [timm.create_model(n, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs) for n in names]
    if blocks:
        members = [BlockPooled(m, blocks, 0) for m in members]
    return ConcatBackbones(members, sizes, num_classes, interpolation)
