"""A backbone whose features are its pooled output joined by the pooled outputs of its last few
blocks: a linear probe's rows with what the middle of the network sees, not only its end.

Why: a frozen backbone's last layer is tuned to ImageNet's classes; the blocks before it keep more
of the image (textures, parts) that another task can use. Pooling them costs no extra forward pass,
only wider rows for the head. Measured by cross-validation on training images (benchmarks/RESULTS.md,
`probe-blocks-*`, EfficientNet-Lite0/2 with their last three blocks): CIFAR-10 (10,000 images at 192 px)
88.78% -> 89.92%; flowers12 +0.05 to +0.47 points; a cat-dog folder +1.2 to +1.5. Not the photo
default: its chosen pair of backbones side by side did not gain (docs/photos.md).

Written here because timm has no module for it: timm's `forward_intermediates` gives the blocks'
outputs, and the wrapper has the few methods of timm's interface that cnnkit calls
(models.features_head), as models.concat's does.
Set with the model argument `pooled_blocks` (`--model-args '{"pooled_blocks": 3}'`), for a linear
probe: fine-tuning groups a timm model's own layers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from cnnkit.models.features_head import FeaturesHead

ARG = "pooled_blocks"  # the model argument that asks for it


class BlockPooled(FeaturesHead):
    def __init__(self, model: nn.Module, blocks: int, num_classes: int):
        """`model`: a timm model without its classifier (num_classes=0); `blocks`: how many of its
        last blocks' outputs are pooled and joined to its features; `num_classes` 0: no head."""
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"{ARG} counts blocks (at least 1); got {blocks}")
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{ARG}: {type(model).__name__} has no forward_intermediates (timm's way to its blocks' outputs)")
        self.model, self.blocks = model, int(blocks)
        # timm's EfficientNets and MobileNets index every block with extra_blocks; other families their stages
        self._every_block = "extra_blocks" in inspect.signature(model.forward_intermediates).parameters
        in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        was_training = model.training
        model.eval()  # BatchNorm's statistics stay as they are
        with torch.no_grad():  # the blocks' widths, from one small image
            widths = [t.shape[1] for t in self._intermediates(torch.zeros(1, in_channels, 64, 64))[1]]
        model.train(was_training)
        self.block_widths = widths
        self.num_features = int(model.num_features) + sum(widths)
        self.set_head(num_classes)

    def _intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        extra = {"extra_blocks": True} if self._every_block else {}
        return self.model.forward_intermediates(x, indices=self.blocks, **extra)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        final, blocks = self._intermediates(x)
        pooled = [b.mean((2, 3)) for b in blocks]
        return torch.cat([*pooled, self.model.forward_head(final, pre_logits=True)], 1)
