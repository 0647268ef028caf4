"""The few methods of timm's model interface that cnnkit calls, for its own wrappers whose
`forward_features` already returns pooled features (models.concat, models.block_pooled): one linear
head on them, found by `replace_head` under the name `head`."""

from __future__ import annotations

import torch
from torch import nn


class FeaturesHead(nn.Module):
    """A subclass sets `num_features` and defines `forward_features` (images -> pooled features)."""

    num_features: int

    def set_head(self, num_classes: int) -> None:
        self.head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"classifier": "head"}  # where replace_head finds the classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.set_head(num_classes)
