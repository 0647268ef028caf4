"""One batch to its loss, the same for the training loop and the learning-rate range test:
uint8 images on the device -> float -> augmentation -> label mixing -> the rest of the
preprocessing (resized to the epoch's size under progressive resizing) -> forward (memory format,
autocast) -> cross-entropy.

A task object in timm's manner (`result = task(input, target)`): the loop and lr-find hold one
and do not repeat its order of operations; evaluation shares its forward (`inference.forward`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cnnkit.augment import Augment
from cnnkit.inference import forward
from cnnkit.preprocess import Preprocess


class TrainStep:
    def __init__(self, net: nn.Module, preprocess: Preprocess, augment: Augment | None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_classes: int,
                 device: torch.device, precision: str, channels_last: bool, seed: int,
                 progressive_sizes: Sequence[int] = ()):
        self.net, self.preprocess, self.augment, self.loss_fn = net, preprocess, augment, loss_fn
        self.num_classes, self.device, self.precision, self.channels_last = num_classes, device, precision, channels_last
        self.seed = seed  # alternating flips are keyed by (seed, image id, epoch)
        # progressive resizing: epoch e (from 1) trains at sizes[e - 1]; after the list, at the input size
        self.sizes = [dataclasses.replace(preprocess, input_size=s) for s in progressive_sizes]

    def preprocess_at(self, epoch: int) -> Preprocess:
        return self.sizes[epoch - 1] if epoch <= len(self.sizes) else self.preprocess

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: torch.Generator, *,
                 ids: torch.Tensor | None = None, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a uint8 batch, augmented with `rng`; the loss is a float32 scalar."""
        preprocess = self.preprocess_at(epoch)
        x = preprocess.to_float(images)
        targets = labels
        if self.augment:
            x = self.augment(x, rng, ids=ids, epoch=epoch, seed=self.seed)
            if self.augment.mixes_labels:  # soft targets: cross-entropy takes class probabilities too
                x, targets = self.augment.mix(x, labels, self.num_classes, rng)
        logits = forward(self.net, preprocess, x, self.device, self.precision, self.channels_last)
        return self.loss_fn(logits.float(), targets), logits
