"""Power normalisation of a linear probe's pooled features: sign(x) * |x| ** p before the head.

Why: a backbone's pooled features are averages of rectified activations, each spread over a long tail
(a channel that fires on a flower's centre is near zero on most photos and large on a few). A linear
head on them weighs the few large values heavily; a square root evens the tail out, so that a
channel's presence counts more than its size (Perronnin, Sanchez and Mensink 2010, "power
normalization" of Fisher vectors; the same step helps pooled CNN features). Measured by 5-fold
cross-validation on training images only (benchmarks/RESULTS.md, `probe-power`): p = 0.5 raised 13 of
15 backbone-and-folder estimates (EfficientNet-Lite0, Lite2 and the two side by side, on flowers12, a
20-a-class subset of it and three synthetic folders), by 0.44 points on average. Not the photo default: on
photos the folds never saw it did not gain (`zen3-fp32-photos-power-val-*`, docs/photos.md).

Written here because neither torch nor timm has it as a module: it is one line, but it must sit in the
model (between the pooled features and the head) so that export, serving and evaluation apply it as
the probe's fit did. Set with the model argument `head_power` (`--model-args '{"head_power": 0.5}'`),
for a linear probe: its gradient is unbounded at 0, so a trained backbone never sees it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ARG = "head_power"  # the model argument that asks for it


class SignedPower(nn.Module):
    def __init__(self, power: float):
        super().__init__()
        self.power = float(power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sign() * x.abs().pow(self.power)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The same on a probe's rows of features (numpy, float32 kept)."""
        return (np.sign(x) * np.abs(x) ** self.power).astype(x.dtype, copy=False)

    def extra_repr(self) -> str:
        return f"power={self.power:g}"
