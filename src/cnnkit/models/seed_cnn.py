"""The course's Keras network, layer for layer.

    Conv2D(32, 3, relu) -> MaxPool(2) -> Conv2D(64, 3, relu) -> MaxPool(2) -> Conv2D(64, 3, relu)
    -> Flatten -> Dense(64, relu) -> Dense(classes)

Valid padding throughout, as Keras' default. The final softmax lives in the loss
(cross-entropy on logits is the numerically stable form of softmax + log-loss);
`predict` applies softmax to report probabilities.
"""

from __future__ import annotations

import torch
from torch import nn


class SeedCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),
        )
        side = ((input_size - 2) // 2 - 2) // 2 - 2
        if side < 1:
            raise ValueError(f"seed-cnn needs inputs of at least 18x18 pixels, got {input_size}")
        # Keras flattens channels-last; the order only matters when porting Keras weights.
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
