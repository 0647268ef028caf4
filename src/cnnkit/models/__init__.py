"""Model factory: cnnkit's own networks by name, and any timm architecture by name."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.block_pooled import ARG as POOLED_BLOCKS
from cnnkit.models.block_pooled import BlockPooled
from cnnkit.models.concat import create_concat, is_concat, member_names
from cnnkit.models.fastnet import FastNet
from cnnkit.models.seed_cnn import SeedCNN
from cnnkit.models.signed_power import ARG as HEAD_POWER
from cnnkit.models.signed_power import SignedPower

OWN_MODELS = {"seed-cnn": SeedCNN, "fastnet": FastNet}


def check_model_name(name: str) -> None:
    """Fail early (before loading data) on a model name that neither cnnkit nor timm knows."""
    if name in OWN_MODELS:
        return
    import timm  # imported here: it takes a second and most commands never need it

    if is_concat(name):
        for member in member_names(name):
            if member in OWN_MODELS:
                raise ConfigError(f"model {name}: {member} is cnnkit's own; backbones side by side are timm models")
            check_model_name(member)
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(OWN_MODELS) + timm.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} cnnkit's own: {', '.join(OWN_MODELS)}; or any timm model name.")


def create_model(name: str, num_classes: int, in_channels: int, input_size: int, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model. Names not of cnnkit's own are looked up in timm; for
    those, `head_hidden=N` puts a hidden layer of N units (ReLU) before the classifier, `head_power=p`
    power-normalises the classifier's input (models.signed_power), and `pooled_blocks=N` joins the
    pooled outputs of its last N blocks to its features (models.block_pooled)."""
    if name in OWN_MODELS:
        try:
            return OWN_MODELS[name](num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model {name}: {e}") from None
    check_model_name(name)
    import timm

    hidden, power = kwargs.pop("head_hidden", None), kwargs.pop(HEAD_POWER, None)
    if is_concat(name):
        model = create_concat(name, num_classes, in_channels, **kwargs)
        if hidden or power:
            replace_head(model, num_classes, hidden, power)
        return model
    blocks = kwargs.pop(POOLED_BLOCKS, None)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0 if blocks else num_classes,
                                  in_chans=in_channels, **kwargs)
        if blocks:
            model = BlockPooled(model, blocks, num_classes)
    except (TypeError, ValueError, AssertionError, RuntimeError, NotImplementedError) as e:
        args = {**kwargs, POOLED_BLOCKS: blocks} if blocks else kwargs
        raise ConfigError(f"model {name}: cannot build it with {args or 'default arguments'}: {e}") from None
    if hidden or power:
        replace_head(model, num_classes, hidden, power)
    return model


def replace_head(model: nn.Module, num_classes: int, hidden: int | None = None, power: float | None = None) -> None:
    """A new classifier for `num_classes`: linear, or (hidden > 0) Linear-ReLU-Linear, the course's
    Dense(128, relu) + Dense(10) on pooled features; with `power`, SignedPower before it (the head is
    then Sequential(SignedPower, classifier))."""
    model.reset_classifier(num_classes)
    if not hidden and not power:
        return
    where = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    linear = model.get_submodule(where) if where else None
    if not isinstance(linear, nn.Linear):
        what = "head_hidden" if hidden else HEAD_POWER
        raise ConfigError(f"{what}: cannot find the linear classifier of {type(model).__name__}")
    head: nn.Module = linear
    if hidden:
        head = nn.Sequential(nn.Linear(linear.in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    model.set_submodule(where, nn.Sequential(SignedPower(power), head) if power else head)


def sum_input_channels(model: nn.Module) -> None:
    """Make an RGB model take one channel by summing its first convolution's weights over the
    input channels (as timm does for in_chans=1): exact for grey images repeated into RGB when
    the normalisation is the same for every channel."""
    where = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    conv = model.get_submodule(where) if where else None
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3:
        raise ConfigError(f"grey_input sum: cannot find the 3-channel first convolution of {type(model).__name__}")
    conv.weight = nn.Parameter(conv.weight.detach().sum(1, keepdim=True))
    conv.in_channels = 1


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
