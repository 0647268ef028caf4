"""The one definition of preprocessing, shared by training, evaluation, prediction and export.

Images are stored as uint8 (C, H, W) at the dataset's own size. The model sees
float32 tensors resized to its input size, with its number of channels, normalised.
The parameters are saved in every checkpoint so later commands reproduce them exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cnnkit.config import Config


@dataclass(frozen=True)
class Preprocess:
    data_size: int  # images are decoded to data_size x data_size ...
    data_channels: int  # ... with this many channels (1 grey, 3 RGB)
    input_size: int  # what the model takes; resized on the device when it differs
    model_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float in [0, 1]; augmentation works at this stage."""
        return images.float().div_(255)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """float [0, 1] -> model input: resized, channels adapted, normalised."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                              align_corners=False, antialias=self.interpolation in ("bilinear", "bicubic"))
        if x.shape[1] == 1 and self.model_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.finish(self.to_float(images))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def channel_stats(images, max_images: int = 20000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on [0, 1] of a uint8 (N, C, H, W) array (a strided sample if large)."""
    step = max(1, len(images) // max_images)
    x = torch.from_numpy(images[::step]).double().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def make_preprocess(cfg: Config, train_images: np.ndarray) -> Preprocess:
    """From-scratch models: normalise with the training images' statistics. Pretrained ones: with
    the statistics, resampling and (by default) input size their weights were trained with."""
    _, channels, height, width = train_images.shape
    if cfg.pretrained:
        from cnnkit.models.concat import is_concat
        from cnnkit.models.pretrained import preprocessing  # torch-free callers of Preprocess skip timm

        w = preprocessing(cfg.model)
        mean, std = tuple(w["mean"]), tuple(w["std"])
        model_channels = 3
        if channels == 1 and cfg.grey_input == "sum":  # one grey channel in, the RGB statistics averaged
            model_channels, mean, std = 1, (sum(mean) / 3,), (sum(std) / 3,)
        # Backbones side by side take the image as decoded and each resizes it to its own size once, as
        # its probe rows were made: resizing twice (to the largest, then down) would give other features.
        size = cfg.input_size or (height if is_concat(cfg.model) else int(w["input_size"]))
        return Preprocess(data_size=height, data_channels=channels, input_size=size,
                          model_channels=model_channels, mean=mean, std=std, interpolation=str(w["interpolation"]))
    mean, std = channel_stats(train_images)
    return Preprocess(data_size=height, data_channels=channels, input_size=cfg.input_size or height,
                      model_channels=channels, mean=mean, std=std)
