"""A fast network for small images (28x28 Fashion-MNIST, 32x32 CIFAR-10), after airbench.

airbench (Keller Jordan, 2024) holds the CIFAR-10 speed record with a small VGG-like net:

    stem: 2x2 convolution, its weights fixed to the whitening transform of 2x2 patches -> GELU
    3 groups: conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU    (widths 64, 256, 256)
    global max pool -> linear (no bias) -> x 1/9

BatchNorm keeps its scale at 1 and learns only its shift; each 3x3 convolution starts as the
identity on its first input channels (dirac). Widths, depth (convolutions per group) and every
one of these choices are parameters, so a recipe can switch each off and measure what it buys.
"""

from __future__ import annotations

import torch
from torch import nn


class FastNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        widths: tuple[int, ...] | list[int] = (64, 256, 256),
        depth: int = 2,  # 3x3 convolutions per group
        whiten: bool = True,  # stem weights from the training data's patch covariance (see init_from_data)
        stem_kernel: int = 2,  # patch size of the stem; a grey image has only 4 directions in a 2x2 patch, 9 in a 3x3
        bn_momentum: float = 0.4,  # PyTorch's convention: the weight of the new batch's statistics
        head_scale: float = 1 / 9,
        dirac_init: bool = True,
    ):
        super().__init__()
        if depth < 1 or not widths:
            raise ValueError("fastnet needs at least one group and one convolution per group")
        if stem_kernel < 1:
            raise ValueError(f"fastnet's stem_kernel must be at least 1, not {stem_kernel}")
        if input_size < 2 ** (len(widths) + 1):
            raise ValueError(f"fastnet with {len(widths)} groups needs inputs of at least {2 ** (len(widths) + 1)} pixels")
        self.whiten = whiten
        stem_width = 2 * in_channels * stem_kernel**2  # each whitening direction and its negation
        self.stem = nn.Conv2d(in_channels, stem_width, kernel_size=stem_kernel, padding=0)
        if whiten:  # fixed by init_from_data; only its bias trains
            self.stem.weight.requires_grad_(False)
        layers: list[nn.Module] = [self.stem, nn.GELU()]
        prev = stem_width
        for width in widths:
            for i in range(depth):
                conv = nn.Conv2d(prev if i == 0 else width, width, 3, padding=1, bias=False)
                if dirac_init:
                    nn.init.dirac_(conv.weight.data[: conv.in_channels])
                bn = nn.BatchNorm2d(width, momentum=bn_momentum, eps=1e-12)
                bn.weight.requires_grad_(False)  # the scale is redundant before GELU + the next BN
                layers += [conv, nn.MaxPool2d(2), bn, nn.GELU()] if i == 0 else [conv, bn, nn.GELU()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(prev, num_classes, bias=False)
        self.head_scale = head_scale

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten kxk patches of preprocessed training images `x` (N, C, H, W):
        the eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), and their negations."""
        if not self.whiten:
            return
        c, k = x.shape[1], self.stem.kernel_size[0]
        # (N, C, H-k+1, W-k+1, k, k) -> one row per patch, in the order of the stem's weights (C, k, k)
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).float()
        filters = filters.reshape(c * k * k, c, k, k)
        self.stem.weight.copy_(torch.cat([filters, -filters]))
        self.stem.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1)) * self.head_scale
