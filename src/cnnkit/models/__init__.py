"""Model factory: cnnkit's own networks by name, and any timm architecture by name."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.fastnet import FastNet
from cnnkit.models.seed_cnn import SeedCNN

OWN_MODELS = {"seed-cnn": SeedCNN, "fastnet": FastNet}


def check_model_name(name: str) -> None:
    """Fail early (before loading data) on a model name that neither cnnkit nor timm knows."""
    if name in OWN_MODELS:
        return
    import timm  # imported here: it takes a second and most commands never need it

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(OWN_MODELS) + timm.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} cnnkit's own: {', '.join(OWN_MODELS)}; or any timm model name.")


def create_model(name: str, num_classes: int, in_channels: int, input_size: int, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model. Names not of cnnkit's own are looked up in timm."""
    if name in OWN_MODELS:
        try:
            return OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model {name}: {e}") from None
    check_model_name(name)
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"model {name}: cannot build it with {kwargs or 'default arguments'}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
